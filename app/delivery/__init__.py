"""Delivery: workers that lease due postbacks and send them, with one retry policy and one circuit breaker
per vendor. Vendor modules never do I/O; everything about sending lives here."""
