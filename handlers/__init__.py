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
    Setting("defaultCurrency", "currency", "Currency when an event has none (an ISO 4217 code, e.g. EUR)"),
    Setting("identityStitching", "boolean", "Fill a server-side event's missing ip, user agent, page url and email "
            "from the browser context last seen for its userId or anonymousId", default=True),
    Setting("dryRun", "boolean", "Translate only: the response lists what would be sent, nothing is sent",
            default=False),
)
ALL_SETTINGS: tuple[Setting, ...] = COMMON_SETTINGS + tuple(s for v in VENDORS for s in v.settings)

__all__ = ["ALL_SETTINGS", "BY_SLUG", "COMMON_SETTINGS", "VENDORS", "Outcome", "Postback", "Settings", "Skip",
           "Vendor"]
