"""Placeholder replaced in the Redis store commit."""
