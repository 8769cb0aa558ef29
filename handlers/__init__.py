"""The vendor registry: one line per vendor, plus the settings every vendor shares."""

from __future__ import annotations

from handlers import audiohook, segmentstream, tracify
from handlers._base import Outcome, Postback, Setting, Settings, Skip, Vendor

VENDORS: tuple[Vendor, ...] = (
    segmentstream.VENDOR,
    tracify.VENDOR,
    audiohook.VENDOR,
)
BY_SLUG = {vendor.slug: vendor for vendor in VENDORS}

COMMON_SETTINGS = (
    Setting("conversionEvents", "array", "Track events that are conversions (Tracify conversion, Audiohook "
            "and SegmentStream event as named)"),
    Setting("defaultCurrency", "string", "Currency when an event has none (ISO 4217, e.g. EUR)"),
    Setting("dryRun", "boolean", "Translate only: the response lists what would be sent, nothing is sent",
            default=False),
)
ALL_SETTINGS: tuple[Setting, ...] = COMMON_SETTINGS + tuple(s for v in VENDORS for s in v.settings)

__all__ = ["ALL_SETTINGS", "BY_SLUG", "COMMON_SETTINGS", "VENDORS", "Outcome", "Postback", "Settings", "Skip",
           "Vendor"]
