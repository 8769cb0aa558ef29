"""segrelay's version, from the installed package's metadata (pyproject.toml)."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    VERSION = version("segrelay")
except PackageNotFoundError:  # running from a source tree that was never installed
    VERSION = "0+unknown"
