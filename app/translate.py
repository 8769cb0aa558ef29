"""One event and its settings -> what every active vendor gets: routed (the accept path) or built in full.

`route` decides the postbacks and skips without building a body: what the accept path stores and answers.
`translate` builds every body: dry runs, `segrelay translate` and the golden files. Delivery builds one vendor's
bodies from the stored event when it leases them (app/stored.py, app/delivery/worker.py).
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

from app.errors import BadRequestError, ForbiddenError
from app.event import Event
from handlers import VENDORS, Postback, Settings, Skip, Vendor
from handlers._base import Target


@dataclass(slots=True)
class Translation:
    postbacks: list[Postback] = field(default_factory=list)
    skips: list[Skip] = field(default_factory=list)
    vendors: list[str] = field(default_factory=list)


def active_vendors(settings: Settings, entitled: Collection[str] = ()) -> list[Vendor]:
    """Vendors enabled by the settings; 400 when one lacks a required setting, 403 when not entitled."""
    enabled = [vendor for vendor in VENDORS if vendor.is_active(settings)]
    refused = [vendor for vendor in enabled if entitled and vendor.slug not in entitled]
    if refused:
        names = " and ".join(f"{v.title} ({v.slug})" for v in refused)
        their, them = ("their", "them") if len(refused) > 1 else ("its", "it")
        raise ForbiddenError(f"This API key is not allowed to send to {names}; remove {their} settings or ask for "
                             f"a key that includes {them}")
    active = []
    for vendor in enabled:
        for setting in vendor.settings:
            if setting.required and settings.get(setting.name) in (None, ""):
                raise BadRequestError(f"Setting '{setting.name}' is required when {vendor.title} is enabled")
        active.append(vendor)
    return active


@dataclass(slots=True)
class Routing:
    targets: list[Target] = field(default_factory=list)
    skips: list[Skip] = field(default_factory=list)
    vendors: list[str] = field(default_factory=list)


def route(event: Event, settings: Settings, vendors: list[Vendor]) -> Routing:
    result = Routing(vendors=[v.slug for v in vendors])
    for vendor in vendors:
        for decision in vendor.route(event, settings):
            if isinstance(decision, Skip):
                result.skips.append(decision)
            else:
                result.targets.append(decision)
    return result


def translate(event: Event, settings: Settings, vendors: list[Vendor]) -> Translation:
    result = Translation(vendors=[v.slug for v in vendors])
    for vendor in vendors:
        for outcome in vendor.build(event, settings):
            (result.postbacks if isinstance(outcome, Postback) else result.skips).append(outcome)  # type: ignore[arg-type]
    return result


def summary(routing: Routing) -> list[dict[str, Any]]:
    """The per-postback part of our answer to Segment."""
    rows: list[dict[str, Any]] = [{"vendor": t.vendor, "target": t.target, "status": "queued"}
                                  for t in routing.targets]
    rows += [{"vendor": s.vendor, "status": "skipped", "reason": s.reason} for s in routing.skips]
    return rows
