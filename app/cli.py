"""The `segrelay` command: its arguments and help. What each command does is in app/serve_commands.py (serve and
its children, check, stub) and app/operator_commands.py (keys, translate, dlq, trace, identities, queue)."""

from __future__ import annotations

import argparse
import sys

from app.config import ConfigError
from app.operator_commands import (
    cmd_dlq_list,
    cmd_dlq_replay,
    cmd_identities_forget,
    cmd_keys_create,
    cmd_keys_list,
    cmd_keys_revoke,
    cmd_queue_stats,
    cmd_trace,
    cmd_translate,
)
from app.serve_commands import cmd_accept_writer, cmd_check, cmd_deliver, cmd_serve, cmd_serve_http, cmd_stub
from app.store import StoreError
from app.version import VERSION
from handlers import BY_SLUG


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        result: int = args.run(args)
    except ConfigError as exc:
        print(f"segrelay: configuration error: {exc}", file=sys.stderr)
        return 2
    except StoreError as exc:  # a store that cannot be opened or used: what it said, not a traceback
        print(f"segrelay: store error: {exc}", file=sys.stderr)
        return 2
    return result


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="segrelay", description="Segment destination partner endpoint: "
                                     "relays events to SegmentStream, Tracify and Audiohook.")
    parser.add_argument("--version", action="version", version=f"segrelay {VERSION}")
    sub = parser.add_subparsers(required=True, metavar="COMMAND")

    serve = sub.add_parser("serve", help="run the HTTP service (POST /segment) on every core, and its delivery "
                                         "workers")
    serve.add_argument("--host", default=None, help="bind address (default SEGRELAY_HOST or 0.0.0.0)")
    serve.add_argument("--port", type=int, default=None, help="port (default SEGRELAY_PORT or 8080)")
    serve.add_argument("--ssl-certfile", default=None, metavar="FILE",
                       help="serve HTTPS with this certificate chain (PEM; default SEGRELAY_SSL_CERTFILE)")
    serve.add_argument("--ssl-keyfile", default=None, metavar="FILE",
                       help="the certificate's private key (PEM; default SEGRELAY_SSL_KEYFILE)")
    serve.add_argument("--delivery-processes", type=int, default=None, metavar="N",
                       help="delivery processes started beside the HTTP process (default "
                            "SEGRELAY_DELIVERY_PROCESSES or one per core, up to 4; 0 delivers inside the HTTP "
                            "process)")
    serve.add_argument("--http-processes", type=int, default=None, metavar="N",
                       help="HTTP processes answering on the port, this one included (default "
                            "SEGRELAY_HTTP_PROCESSES or one per core, up to 4; one fewer on SQLite, "
                            "whose accept writer takes a core's share)")
    serve.set_defaults(run=cmd_serve)

    serve_http = sub.add_parser("serve-http", help="one more HTTP process of serve on serve's port (serve starts "
                                                   "these itself)")
    serve_http.add_argument("--host", required=True, help="the address serve listens on")
    serve_http.add_argument("--port", type=int, required=True, help="its port (shared with SO_REUSEPORT)")
    serve_http.add_argument("--slot", type=int, required=True, help="this process's slot at SQLite's write lock")
    serve_http.add_argument("--health-fd", type=int, required=True, help="the shared health flag (memfd)")
    serve_http.add_argument("--wake-fd", type=int, default=None, help="the delivery processes' wake-up pipe")
    serve_http.add_argument("--wake-count", type=int, default=0, help="how many delivery processes it wakes")
    serve_http.add_argument("--http-processes", type=int, required=True, help="how many HTTP processes serve runs")
    serve_http.add_argument("--parent-pid", type=int, default=None, help="serve's pid: this process dies with it")
    serve_http.add_argument("--ssl-certfile", default=None, metavar="FILE", help="certificate chain (PEM)")
    serve_http.add_argument("--ssl-keyfile", default=None, metavar="FILE", help="its private key (PEM)")
    serve_http.add_argument("--accept-writer", default=None, metavar="SOCKET",
                            help="the accept writer's socket (SQLite): accepted events are stored by it")
    serve_http.set_defaults(run=cmd_serve_http)

    writer = sub.add_parser("accept-writer", help="store the events that serve's HTTP processes accept, in one "
                                                  "process (SQLite; serve starts it itself)")
    writer.add_argument("--database", required=True, help="the SQLite file (serve passes its own)")
    writer.add_argument("--socket", required=True, help="the Unix socket the HTTP processes send accepts to")
    writer.add_argument("--slot", type=int, required=True, help="this process's slot at SQLite's write lock")
    writer.add_argument("--parent-pid", type=int, default=None, help="serve's pid: this process dies with it")
    writer.set_defaults(run=cmd_accept_writer)

    deliver = sub.add_parser("deliver", help="run only the delivery side on the configured store (serve starts "
                                             "it for you; run it yourself to deliver from a shared Redis)")
    deliver.add_argument("--wake-fd", type=int, default=None, help=argparse.SUPPRESS)
    deliver.add_argument("--parent-pid", type=int, default=None, help=argparse.SUPPRESS)
    deliver.add_argument("--slot", type=int, default=None, help=argparse.SUPPRESS)
    deliver.set_defaults(run=cmd_deliver)

    keys = sub.add_parser("keys", help="issue, list and revoke the API keys customers paste into Segment")
    keys_sub = keys.add_subparsers(required=True, metavar="ACTION")
    create = keys_sub.add_parser("create", help="issue a key (printed once, stored only as an HMAC)")
    create.add_argument("--tenant", required=True, help="customer name the key belongs to")
    create.add_argument("--expires-in-days", type=float, default=None, help="expiry (default: never)")
    create.add_argument("--vendors", default="", help=f"comma-separated vendors the key may send to "
                        f"(default: all of {', '.join(BY_SLUG)})")
    create.add_argument("--json", action="store_true", help="print one JSON object")
    create.set_defaults(run=cmd_keys_create)
    listing = keys_sub.add_parser("list", help="key ids, tenants, expiry, vendors, revoked (never the key)")
    listing.add_argument("--json", action="store_true", help="print a JSON array")
    listing.set_defaults(run=cmd_keys_list)
    revoke = keys_sub.add_parser("revoke", help="revoke a key by its id (effective within seconds)")
    revoke.add_argument("key_id", help="the key's id (the part after sr_, as `keys list` shows it)")
    revoke.set_defaults(run=cmd_keys_revoke)

    tr = sub.add_parser("translate", help="print what events would become, without sending anything",
                        description="Print what each event would become for each vendor enabled by --settings. A file "
                                    "of several events (a JSON array or JSON lines) is read in order, stitching "
                                    "identities across them as the server would (in memory; no store is used).")
    tr.add_argument("--settings", default="{}", help="destination settings: JSON text or a JSON file")
    tr.add_argument("event", nargs="?", default="-", help="a Segment event as JSON, a JSON array of events or JSON "
                                                          "lines, in a file or - for stdin")
    tr.set_defaults(run=cmd_translate)

    dlq = sub.add_parser("dlq", help="dead letters: postbacks a vendor refused or that ran out of retries")
    dlq_sub = dlq.add_subparsers(required=True, metavar="ACTION")
    dlist = dlq_sub.add_parser("list", help="vendor, tenant, event, attempts, last status and body")
    dlist.add_argument("--vendor", choices=sorted(BY_SLUG), help="only this vendor's dead letters")
    dlist.add_argument("--limit", type=int, default=100, help="at most this many, oldest first (default 100)")
    dlist.add_argument("--json", action="store_true", help="print a JSON array")
    dlist.set_defaults(run=cmd_dlq_list)
    replay = dlq_sub.add_parser("replay", help="queue dead letters again (attempts reset), rendered with the "
                                "latest settings Segment sent with their API key (fix a token in Segment, then replay)")
    group = replay.add_mutually_exclusive_group(required=True)
    group.add_argument("--all", action="store_true", help="every dead letter")
    group.add_argument("ids", nargs="*", default=[], metavar="ID", help="dead-letter ids, as `dlq list` shows them")
    replay.add_argument("--settings", default=None, help="render with these destination settings (JSON text or "
                        "file) instead of the latest ones received from Segment with the event's API key")
    replay.set_defaults(run=cmd_dlq_replay)

    check = sub.add_parser("check", help="send Segment's test-suite calls and contract probes to a deployed "
                                         "endpoint and show what Segment would see (exit 0 only if all pass)")
    check.add_argument("url", help="the endpoint, e.g. https://relay.example.com/segment")
    check.add_argument("--key", required=True, help="an API key issued by that deployment")
    check.add_argument("--settings", default="{}", help="destination settings: JSON text or a JSON file "
                       "(default none: nothing is queued for a vendor)")
    check.add_argument("--json", action="store_true", help="print the results as JSON")
    check.set_defaults(run=cmd_check)

    stub = sub.add_parser("stub", help="a local stand-in for the three vendors that records what it receives "
                                       "(GET /_stub/requests); for trying segrelay without real vendors")
    stub.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1: keep it local)")
    stub.add_argument("--port", type=int, default=9000, help="port (default 9000)")
    stub.set_defaults(run=cmd_stub)

    trace = sub.add_parser("trace", help="what became of one event, per vendor: queued, retrying (next attempt), "
                                         "leased, delivered (when, status), dead (status, answer) or skipped (why)")
    trace.add_argument("message_id", metavar="MESSAGE_ID", help="the event's messageId, as Segment sent it")
    trace.add_argument("--tenant", default=None, help="only this tenant's event of that messageId")
    trace.add_argument("--json", action="store_true", help="print a JSON array")
    trace.set_defaults(run=cmd_trace)

    ids = sub.add_parser("identities", help="remembered browser contexts (identity stitching)")
    ids_sub = ids.add_subparsers(required=True, metavar="ACTION")
    forget = ids_sub.add_parser("forget", help="delete what is remembered of one person now (and of the ids linked "
                                               "to it), e.g. for a deletion request")
    forget.add_argument("--tenant", required=True, help="the tenant of the API key the person's events came with")
    who = forget.add_mutually_exclusive_group(required=True)
    who.add_argument("--user-id", help="the person's userId, exactly as sent")
    who.add_argument("--anonymous-id", help="an anonymousId, exactly as sent")
    forget.set_defaults(run=cmd_identities_forget)

    queue = sub.add_parser("queue", help="the delivery queue")
    queue_sub = queue.add_subparsers(required=True, metavar="ACTION")
    stats = queue_sub.add_parser("stats", help="per vendor: PENDING waiting to be sent (due now or later), LEASED "
                                               "being sent, DUE pending and due now, DEAD in the dead-letter store")
    stats.add_argument("--json", action="store_true", help="print one JSON object, by vendor")
    stats.set_defaults(run=cmd_queue_stats)
    return parser


if __name__ == "__main__":
    raise SystemExit(main())
