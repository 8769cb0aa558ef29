"""The operator's commands: keys, translate, dlq, trace, identities, queue; and how a command opens the store."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import orjson
from cryptography.exceptions import InvalidTag

from app.config import (
    DEFAULT_STORE,
    Config,
    ConfigError,
    vendor_urls,
)
from app.crypto import KeyHasher, Sealer
from app.errors import ContractError
from app.event import parse_event
from app.identity import Context, IdentityBook, stitch
from app.keys import new_key
from app.outgoing import preview
from app.settings import resolve
from app.store import Store, open_store
from app.stored import unpack_event, with_settings
from app.translate import active_vendors, translate
from handlers import BY_SLUG

T = TypeVar("T")


def existing_store_config() -> Config:
    """The configuration of a command that reads the store: it never creates one where none is.

    With the embedded store, a command run from another directory would otherwise open a new, empty database
    beside it (and a new secret): zeros for stats, no dead letters, keys the server does not know.
    """
    store = os.environ.get("SEGRELAY_STORE", DEFAULT_STORE)
    given = os.environ.get("SEGRELAY_SECRET") or os.environ.get("SEGRELAY_SECRET_FILE")
    # Every variable is checked first; a secret beside the store is only looked up (or made) once it exists.
    Config.from_env(None if given else {**os.environ, "SEGRELAY_SECRET": "-" * 32})
    if store.startswith("sqlite:///"):
        path = Path(store.removeprefix("sqlite:///")).resolve()
        if not path.exists():
            raise ConfigError(f"no store at {path}: run this command where `segrelay serve` runs, or set "
                              f"SEGRELAY_STORE=sqlite:///<absolute path of the database> (serve logs its store "
                              f"at start-up)")
    return Config.from_env()


def with_store(config: Config, action: Callable[[Store], Coroutine[Any, Any, T]]) -> T:
    async def run() -> T:
        store = open_store(config.store)
        try:
            return await action(store)
        finally:
            await store.close()
    return asyncio.run(run())


def dump(value: Any) -> None:
    sys.stdout.write(orjson.dumps(value, option=orjson.OPT_INDENT_2).decode() + "\n")


def time_text(ts: float | None) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%SZ") if ts else "never"



# keys ---------------------------------------------------------------------------------------------------


def cmd_keys_create(args: argparse.Namespace) -> int:
    config = Config.from_env()
    vendors = tuple(v.strip() for v in args.vendors.split(",") if v.strip())
    unknown = [v for v in vendors if v not in BY_SLUG]
    if unknown:
        print(f"segrelay: unknown vendor(s): {', '.join(unknown)} (known: {', '.join(BY_SLUG)})", file=sys.stderr)
        return 2
    if not args.tenant.strip():
        print("segrelay: --tenant must not be empty", file=sys.stderr)
        return 2
    now = time.time()
    expires = now + args.expires_in_days * 86_400 if args.expires_in_days is not None else None
    key, record = new_key(KeyHasher(config.secret), args.tenant.strip(), now, expires, vendors)

    with_store(config, lambda store: store.save_key(record))
    if config.sqlite_path is not None:  # which store holds the key: the server must use the same one
        print(f"segrelay: key stored in sqlite:///{config.sqlite_path.resolve()}", file=sys.stderr)
    if args.json:
        dump({"key": key, **record.public()})
    else:
        print(f"key:     {key}\nkey id:  {record.key_id}\ntenant:  {record.tenant}\n"
              f"expires: {time_text(expires)}\nvendors: {', '.join(vendors) or 'all'}\n"
              "The key is shown only now; segrelay keeps only its HMAC.")
    return 0


def cmd_keys_list(args: argparse.Namespace) -> int:
    config = existing_store_config()

    records = with_store(config, lambda store: store.list_keys())
    if args.json:
        dump([r.public() for r in records])
        return 0
    print(f"{'KEY ID':<14}{'TENANT':<24}{'EXPIRES':<22}{'VENDORS':<34}REVOKED")
    for r in records:
        print(f"{r.key_id:<14}{r.tenant[:23]:<24}{time_text(r.expires_at):<22}{','.join(r.vendors) or 'all':<34}"
              f"{'yes' if r.revoked else 'no'}")
    return 0


def cmd_keys_revoke(args: argparse.Namespace) -> int:
    config = existing_store_config()

    if not with_store(config, lambda store: store.revoke_key(args.key_id)):
        print(f"segrelay: no key with id {args.key_id}", file=sys.stderr)
        return 1
    print(f"revoked {args.key_id}")
    return 0


# translate ----------------------------------------------------------------------------------------------


def _json_arg(value: str, what: str) -> Any:
    text = value
    if not value.lstrip().startswith(("{", "[")):
        path = Path(value)
        if not path.is_file():
            raise ValueError(f"{what}: {value} is neither JSON nor a readable file")
        text = path.read_text()
    return orjson.loads(text)


def settings_arg(value: str) -> dict[str, Any]:
    """--settings: a JSON object, given as text or as a file."""
    settings = _json_arg(value, "--settings")
    if not isinstance(settings, dict):
        raise ValueError("--settings must be a JSON object")
    return settings


def cmd_translate(args: argparse.Namespace) -> int:
    urls = vendor_urls(os.environ)
    try:
        raw_settings = settings_arg(args.settings)
        raw = sys.stdin.buffer.read() if args.event == "-" else Path(args.event).read_bytes()
        documents = _events_arg(raw)
    except (ValueError, OSError) as exc:
        print(f"segrelay: {exc}", file=sys.stderr)
        return 2
    remembered: dict[str, Context] = {}  # identity stitching across the file's events, in memory
    results, failed = [], False
    for document in documents:
        body = orjson.dumps(document) if len(documents) > 1 else raw
        try:
            settings = resolve(raw_settings)
            event = parse_event(document, body, datetime.now(UTC), settings.get("defaultCurrency"))
            vendors = active_vendors(settings)
            if settings.get("identityStitching"):
                keys = [k for k in (event.user_id and f"user:{event.user_id}",
                                    event.anonymous_id and f"anonymous:{event.anonymous_id}") if k]
                _, updates = stitch(event, keys, [remembered.get(k) for k in keys], now=time.time())
                remembered.update(updates)
            translation = translate(event, settings, vendors)
        except ContractError as exc:
            results.append({"status": exc.status_code, "message": exc.message})
            failed = True
            continue
        result: dict[str, Any] = preview(translation.postbacks, translation.skips, urls)
        if event.stitched:
            result["stitched"] = event.stitched
        if event.warnings:
            result["warnings"] = event.warnings
        results.append(result)
    dump(results if len(documents) > 1 else results[0])
    return 1 if failed else 0


def _events_arg(raw: bytes) -> list[Any]:
    """One event, a JSON array of events, or JSON lines (one event per line)."""
    try:
        document = orjson.loads(raw)
    except orjson.JSONDecodeError:
        lines = [line for line in raw.splitlines() if line.strip()]
        if len(lines) < 2:
            raise
        return [orjson.loads(line) for line in lines]
    if isinstance(document, list):
        if not document:
            raise ValueError("the file holds an empty list of events")
        return document
    return [document]


# dlq and queue ------------------------------------------------------------------------------------------


def cmd_dlq_list(args: argparse.Namespace) -> int:
    config = existing_store_config()

    letters = with_store(config, lambda store: store.dead_letters(args.vendor, args.limit))
    if args.json:
        dump([{"id": d.id, "vendor": d.vendor, "tenant": d.tenant, "message_id": d.message_id,
                "event": d.event_name, "attempts": d.attempts, "last_status": d.last_status,
                "last_body": d.last_body, "created_at": d.created_at, "died_at": d.died_at} for d in letters])
        return 0
    if not letters:
        print("no dead letters")
    for d in letters:
        print(f"{d.id}  {d.vendor}  tenant={d.tenant}  event={d.event_name!r}  message_id={d.message_id}  "
              f"attempts={d.attempts}  status={d.last_status if d.last_status is not None else 'network error'}"
              f"  died={time_text(d.died_at)}\n    {d.last_body[:300]}")
    return 0


def cmd_dlq_replay(args: argparse.Namespace) -> int:
    if not args.all and not args.ids:
        print("segrelay: give dead-letter ids or --all", file=sys.stderr)
        return 2
    override: bytes | None = None
    if args.settings is not None:
        try:
            override = orjson.dumps(resolve(settings_arg(args.settings)))
        except (ValueError, OSError, ContractError) as exc:
            print(f"segrelay: {getattr(exc, 'message', exc)}", file=sys.stderr)
            return 2
    config = existing_store_config()
    sealer = Sealer(config.secret)

    async def action(store: Store) -> tuple[int, int, list[str]]:
        ids = [d.id for d in await store.dead_letters(limit=1_000_000)] if args.all else list(args.ids)
        rerendered, unknown = 0, []
        for job_id in ids:
            found = await store.dead_letter_payload(job_id)  # None unless it is a dead letter
            if found is None:
                unknown.append(job_id)
                continue
            event_id, payload = found
            try:
                stored = sealer.open(payload)
            except InvalidTag:  # sealed under another secret: replayed as it is (and dead-lettered again)
                continue
            settings = override
            if settings is None:
                latest = await store.latest_settings(unpack_event(stored).key_id)
                settings = sealer.open(latest) if latest is not None else None
            if settings is not None:
                await store.replace_payload(event_id, sealer.seal(with_settings(stored, settings)))
                rerendered += 1
        known = [i for i in ids if i not in unknown]
        count = await store.replay(known, now=time.time()) if known else 0
        return count, rerendered, unknown

    count, rerendered, unknown = with_store(config, action)
    for job_id in unknown:
        print(f"segrelay: no dead letter with id {job_id}", file=sys.stderr)
    source = "the --settings given" if override is not None else "the latest settings received with their API key"
    print(f"replayed {count} dead letter(s); {rerendered} rendered again with {source}"
          + (f", {count - rerendered} with the settings they were stored with" if count - rerendered else ""))
    return 0 if (count or args.all) and not unknown else 1


def cmd_trace(args: argparse.Namespace) -> int:
    config = existing_store_config()
    outcomes = with_store(config, lambda store: store.trace(args.message_id, args.tenant))
    if args.json:
        dump([{"tenant": o.tenant, "vendor": o.vendor, "target": o.target, "state": o.state, "attempts": o.attempts,
                "status": o.status, "detail": o.detail, "at": o.at, "next_at": o.next_at} for o in outcomes])
        return 0 if outcomes else 1
    if not outcomes:
        print(f"segrelay: nothing known of messageId {args.message_id!r}"
              f"{f' for tenant {args.tenant}' if args.tenant else ''}: never stored here (an event with nothing to "
              f"send is not kept; the answer to Segment gave its reasons), or older than the idempotency window",
              file=sys.stderr)
        return 1
    print(f"{'TENANT':<14}{'VENDOR':<15}{'TARGET':<13}{'STATE':<11}{'ATTEMPTS':>8}  {'STATUS':<7}WHEN / DETAIL")
    for o in outcomes:
        when = (f"next attempt {time_text(o.next_at)}" if o.state in ("queued", "retrying") else
                f"lease ends {time_text(o.next_at)}" if o.state == "leased" else time_text(o.at))
        detail = f"  {o.detail[:120]}" if o.detail else ""
        print(f"{o.tenant:<14}{o.vendor:<15}{o.target or '-':<13}{o.state:<11}{o.attempts:>8}  "
              f"{o.status if o.status is not None else '-'!s:<7}{when}{detail}")
    return 0


def cmd_identities_forget(args: argparse.Namespace) -> int:
    config = existing_store_config()

    async def forget(store: Store) -> int:
        book = IdentityBook(store, Sealer(config.secret), config.secret, ttl_seconds=config.identity_ttl_days * 86_400)
        return await book.forget(args.tenant.strip(), user_id=args.user_id, anonymous_id=args.anonymous_id)
    gone = with_store(config, forget)
    who = f"userId {args.user_id!r}" if args.user_id else f"anonymousId {args.anonymous_id!r}"
    print(f"forgot {gone} remembered identit{'y' if gone == 1 else 'ies'} of {who} (tenant {args.tenant.strip()}) "
          f"and the ids linked to it")
    return 0


def cmd_queue_stats(args: argparse.Namespace) -> int:
    config = existing_store_config()

    stats = with_store(config, lambda store: store.stats(now=time.time()))
    rows = {slug: stats.vendors.get(slug) for slug in BY_SLUG}
    table = {slug: {"pending": s.pending, "leased": s.leased, "due": s.due, "dead": s.dead} if s else
             {"pending": 0, "leased": 0, "due": 0, "dead": 0} for slug, s in rows.items()}
    if args.json:
        dump(table)
        return 0
    print(f"{'VENDOR':<16}{'PENDING':>9}{'LEASED':>9}{'DUE':>9}{'DEAD':>9}")
    for slug, row in table.items():
        print(f"{slug:<16}{row['pending']:>9}{row['leased']:>9}{row['due']:>9}{row['dead']:>9}")
    return 0

