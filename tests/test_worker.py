"""The delivery worker in process, with a transport function of the test's own standing in for the vendors."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import orjson
import pytest

from app.config import Config
from app.crypto import Sealer
from app.delivery import worker
from app.delivery.transport import AiohttpTransport, RequestRefused, SendFailed, VendorAnswer
from app.delivery.worker import Deliverer
from app.event import parse_event
from app.outgoing import EncodedPostback, OutgoingRequest
from app.settings import resolve
from app.store import Job, NewJob
from app.store.sqlite import SQLiteStore
from app.stored import Renderer, pack_event
from app.translate import active_vendors, translate
from tests.support import ALL_VENDORS, AUDIOHOOK_ID, FIXTURES

SECRET = b"s" * 40
SITE = "3f1c2d4e-5a6b-4c7d-8e9f-0a1b2c3d4e5f"


async def accept_page(store: SQLiteStore, sealer: Sealer, n: int, tenant: str = "acme", token: str = "t") -> None:
    """A page view with Tracify enabled, stored the way the accept path stores it."""
    settings = resolve({"tracifyApiToken": token, "tracifyCustomerSiteId": SITE})
    body = orjson.dumps({"type": "page", "messageId": f"m{n}", "anonymousId": "a", "timestamp":
                         "2026-11-20T10:00:00Z", "context": {"ip": "1.2.3.4", "userAgent": "UA",
                                                             "page": {"url": f"https://shop.example/p{n}"}}})
    now = time.time()
    event = parse_event(orjson.loads(body), body, datetime.fromtimestamp(now, UTC))
    translation = translate(event, settings, active_vendors(settings))
    jobs = [NewJob(p.vendor, p.target, "page", p.batch_key) for p in translation.postbacks]
    payload = sealer.seal(pack_event(orjson.dumps(settings), now, body))
    assert await store.accept(tenant, f"m{n}", payload, jobs, now=now, ttl=60)


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SQLiteStore]:
    opened = SQLiteStore(str(tmp_path / "store.db"))
    yield opened
    await opened.close()


async def run_until(deliverer: Deliverer, check: Callable[[], Awaitable[bool]], timeout: float = 5.0) -> None:
    deliverer.start()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not await check():
        await asyncio.sleep(0.02)
    await deliverer.stop(drain_seconds=1)


def config(retry_base_seconds: float = 2.0) -> Config:
    return Config(secret=SECRET, retry_base_seconds=retry_base_seconds,
                  vendor_urls={"segmentstream": "http://ss", "tracify": "http://tr", "audiohook": "http://ah"})


def answering(status: int, body: bytes = b"", retry_after: str | None = None,
              seen: list[OutgoingRequest] | None = None) -> Callable[[str, OutgoingRequest], Awaitable[VendorAnswer]]:
    async def transport(vendor: str, request: OutgoingRequest) -> VendorAnswer:
        if seen is not None:
            seen.append(request)
        return VendorAnswer(status, body, retry_after)
    return transport


async def pending(store: SQLiteStore) -> int:
    return sum((await store.counts()).pending.values())


async def test_tracify_jobs_due_together_go_in_one_request_rendered_from_the_stored_event(
        store: SQLiteStore) -> None:
    sealer, seen = Sealer(SECRET), []
    for n in range(3):
        await accept_page(store, sealer, n)
    deliverer = Deliverer(config(), store, sealer, transport=answering(200, b'{"status": true}', seen=seen))

    async def done() -> bool:
        return await pending(store) == 0
    await run_until(deliverer, done)
    (request,) = seen
    assert request.url == "http://tr/api/v1/events" and request.headers["tracify-token"] == "t"
    events = orjson.loads(request.content)["events"]
    assert sorted(e["url"] for e in events) == [f"https://shop.example/p{n}" for n in range(3)]
    assert all(e["type"] == "pageview" and e["customer_site_id"] == SITE for e in events)


async def test_retry_after_pauses_the_vendor_and_delays_the_job(store: SQLiteStore) -> None:
    sealer = Sealer(SECRET)
    await accept_page(store, sealer, 0)
    deliverer = Deliverer(config(), store, sealer, transport=answering(429, retry_after="30"))

    async def retried() -> bool:  # the answer seen, and the job back in the queue (not leased)
        stats = (await store.stats(now=time.time())).vendors["tracify"]
        return deliverer.paused_until["tracify"] > 0 and stats.pending == 1 and stats.leased == 0
    started = time.time()
    await run_until(deliverer, retried)
    assert deliverer.paused_until["tracify"] >= started + 30
    assert await store.lease("tracify", now=started + 29, limit=5, lease_seconds=60) == []
    (job,) = await store.lease("tracify", now=started + 31, limit=5, lease_seconds=60)
    assert job.attempts == 1


async def test_a_payload_sealed_under_another_secret_is_dead_lettered_not_dropped(store: SQLiteStore) -> None:
    await accept_page(store, Sealer(b"o" * 40), 0)
    deliverer = Deliverer(config(), store, Sealer(SECRET), transport=answering(200, b'{"status": true}'))

    async def buried() -> bool:
        return len(await store.dead_letters()) == 1
    await run_until(deliverer, buried)
    (letter,) = await store.dead_letters()
    assert "cannot be decrypted" in letter.last_body and letter.last_status is None


async def test_connection_errors_open_the_circuit(store: SQLiteStore) -> None:
    sealer = Sealer(SECRET)
    for n in range(6):
        await accept_page(store, sealer, n, tenant=f"t{n}")

    async def refuse(vendor: str, request: OutgoingRequest) -> VendorAnswer:
        raise SendFailed("ClientConnectorError: could not connect", connect=True)

    deliverer = Deliverer(config(retry_base_seconds=0.01), store, sealer, transport=refuse)

    async def opened() -> bool:
        return deliverer.breakers["tracify"].is_open(time.time())
    await run_until(deliverer, opened)
    assert deliverer.breakers["tracify"].is_open(time.time())
    assert await store.dead_letters() == []  # connection errors are retried


async def test_a_request_our_client_refuses_is_a_dead_letter_not_a_vendor_failure(store: SQLiteStore) -> None:
    sealer, calls = Sealer(SECRET), []
    for n in range(40):
        await accept_page(store, sealer, n, tenant=f"t{n}", token="bad")

    async def refuse(vendor: str, request: OutgoingRequest) -> VendorAnswer:
        calls.append(request)
        raise RequestRefused("ValueError: the HTTP client refused the request as built")

    deliverer = Deliverer(config(retry_base_seconds=0.01), store, sealer, transport=refuse)

    async def all_dead() -> bool:
        return len(await store.dead_letters()) == 40
    await run_until(deliverer, all_dead)
    letters = await store.dead_letters()
    assert len(letters) == 40 and all("segrelay could not send this request" in d.last_body for d in letters)
    assert not deliverer.breakers["tracify"].is_open(time.time())  # other tenants' Tracify goes on
    assert await pending(store) == 0 and len(calls) <= 40  # each tried once, never again


@pytest.mark.parametrize("value", ["tok\r\nX-Evil: 1", "tok\x00", "t\u00f6ken"])
async def test_aiohttp_refusing_a_header_value_is_reported_as_refused(value: str) -> None:
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    transport = AiohttpTransport(concurrency=2, connect_timeout=2, read_timeout=2)
    request = OutgoingRequest("POST", f"http://127.0.0.1:{port}/api/v1/events", {"tracify-token": value}, b"{}")
    try:
        ok = await transport("tracify", OutgoingRequest("POST", request.url, {"tracify-token": "fine"}, b"{}"))
        assert ok.status == 200
        with pytest.raises(RequestRefused):
            await transport("tracify", request)
    finally:
        await transport.close()
        server.close()
        await server.wait_closed()


async def test_a_new_event_never_gets_the_body_of_an_earlier_one(store: SQLiteStore) -> None:
    """Ids of finished events are never reused, and the delivery cache keys on the payload too."""
    sealer, seen = Sealer(SECRET), []
    deliverer = Deliverer(config(), store, sealer, transport=answering(200, b'{"status": true}', seen=seen))

    async def done() -> bool:
        return await pending(store) == 0
    await accept_page(store, sealer, 1)
    await run_until(deliverer, done)
    await accept_page(store, sealer, 2)
    deliverer = Deliverer(config(), store, sealer, transport=answering(200, b'{"status": true}', seen=seen))
    deliverer.renderer = Renderer(sealer)
    await run_until(deliverer, done)
    urls = [orjson.loads(r.content)["events"][0]["url"] for r in seen]
    assert urls == ["https://shop.example/p1", "https://shop.example/p2"]


def test_the_render_cache_tells_apart_two_events_that_share_an_id() -> None:
    sealer = Sealer(SECRET)
    renderer = Renderer(sealer)
    settings = orjson.dumps(resolve({"audiohookId": "9b2f7c3a-1d4e-4f5a-8b6c-7d8e9f0a1b2c"}))
    bodies = []
    for n in (1, 2):
        body = orjson.dumps({"type": "page", "messageId": f"m{n}", "anonymousId": "a", "context": {
            "ip": "1.2.3.4", "userAgent": "UA", "page": {"url": f"https://shop.example/p{n}"}}})
        job = Job("7", "42", "audiohook", "pixel", "acme", f"m{n}", "page", "", sealer.seal(
            pack_event(settings, 1.0, body)), 0, 1.0, 100)
        rendered = renderer.render(job)
        assert isinstance(rendered, EncodedPostback)
        bodies.append(orjson.loads(rendered.content)["url"])
    assert bodies == ["https://shop.example/p1", "https://shop.example/p2"]


async def test_a_stored_event_that_no_longer_builds_is_a_dead_letter_not_a_retry_loop(store: SQLiteStore) -> None:
    sealer = Sealer(SECRET)
    settings = orjson.dumps({"tracifyCustomerSiteId": SITE})  # the token is missing: build() raises KeyError
    body = orjson.dumps({"type": "page", "messageId": "m1", "anonymousId": "a", "context": {
        "ip": "1.2.3.4", "userAgent": "UA", "page": {"url": "https://shop.example/p"}}})
    now = time.time()
    await store.accept("acme", "m1", sealer.seal(pack_event(settings, now, body)),
                       [NewJob("tracify", "events", "page", "k")], now=now, ttl=60)
    calls: list[OutgoingRequest] = []
    deliverer = Deliverer(config(), store, sealer, transport=answering(200, b'{"status": true}', seen=calls))

    async def buried() -> bool:
        return len(await store.dead_letters()) == 1
    await run_until(deliverer, buried)
    (letter,) = await store.dead_letters()
    assert "could not build this postback" in letter.last_body and "KeyError" in letter.last_body
    assert calls == [] and await pending(store) == 0


def loud_tenant_hangs(store: SQLiteStore, sealer: Sealer, hang: asyncio.Event, seen: list[str]) -> Deliverer:
    """A deliverer (not started) of 4 Tracify slots, 1 per tenant while others wait, whose vendor notes each
    request's token in `seen` and hangs the loud tenant's requests until `hang` is set: it stays at its limit."""
    async def transport(vendor: str, request: OutgoingRequest) -> VendorAnswer:
        seen.append(request.headers["tracify-token"])
        if request.headers["tracify-token"].startswith("loud"):
            await hang.wait()
        return VendorAnswer(200, b'{"status": true}')

    cfg = Config(secret=SECRET, vendor_concurrency=4, tenant_concurrency=1,
                 vendor_urls={"segmentstream": "http://ss", "tracify": "http://tr", "audiohook": "http://ah"})
    return Deliverer(cfg, store, sealer, transport=transport)


async def test_a_tenant_alone_at_its_limit_is_not_leased_and_handed_back_while_another_is_found(
        store: SQLiteStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """A tenant at its in-flight limit with a backlog: the once-a-second look for other tenants' jobs happens only
    when the store's counters show another tenant queued, so one tenant alone costs no lease-and-release churn."""
    monkeypatch.setattr(worker, "READY_PER_TENANT", 0)  # each tenant's share of the ready list: READY_MIN jobs
    monkeypatch.setattr(worker, "READY_MIN", 8)
    sealer, hang, seen = Sealer(SECRET), asyncio.Event(), []
    for n in range(60):
        await accept_page(store, sealer, n, tenant="loud", token=f"loud-{n}")  # one request each

    deliverer = loud_tenant_hangs(store, sealer, hang, seen)
    released: list[int] = []
    release = store.release

    async def counting_release(jobs: list[Job], *, due_at: float) -> None:
        released.append(len(jobs))
        await release(jobs, due_at=due_at)
    store.release = counting_release  # type: ignore[method-assign]
    deliverer.start()
    await asyncio.sleep(2.5)
    assert len(seen) == 3  # alone, the loud tenant may use every slot but one tenant's share
    assert sum(released) == 0
    await accept_page(store, sealer, 100, tenant="quiet", token="quiet")
    deadline = time.monotonic() + 3
    while "quiet" not in seen and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert "quiet" in seen  # the look for other tenants still finds a newcomer behind the backlog
    assert sum(released) == 0  # ... passing over the loud tenant's jobs, not leasing and handing them back
    hang.set()
    await deliverer.stop(drain_seconds=1)


async def loud_backlog_beside_a_waiting_retry(store: SQLiteStore, monkeypatch: pytest.MonkeyPatch) -> Sealer:
    """A loud tenant's 60 Tracify postbacks, and another tenant's one waiting for a retry due in an hour (it shows in
    the counters but cannot be leased); each tenant's share of the ready list READY_MIN (8) jobs. Returns the
    sealer the events were stored with."""
    monkeypatch.setattr(worker, "READY_PER_TENANT", 0)
    monkeypatch.setattr(worker, "READY_MIN", 8)
    sealer = Sealer(SECRET)
    await accept_page(store, sealer, 500, tenant="waiting", token="waiting")
    parked = await store.lease("tracify", now=time.time(), limit=5, lease_seconds=60)
    await store.release(parked, due_at=time.time() + 3600)  # a retry due in an hour
    for n in range(60):
        await accept_page(store, sealer, n, tenant="loud", token=f"loud-{n}")
    return sealer


async def test_looks_that_find_only_jobs_not_yet_due_slow_down_until_a_tenant_comes(
        store: SQLiteStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """Another tenant's postbacks waiting for their retry time show in the counters but cannot be leased: the looks
    past the blocked tenant's backlog back off (each finds nothing) and return to once a second for a newcomer."""
    sealer, hang, seen = await loud_backlog_beside_a_waiting_retry(store, monkeypatch), asyncio.Event(), []

    deliverer = loud_tenant_hangs(store, sealer, hang, seen)
    deliverer.start()
    await asyncio.sleep(worker.PROBE_GRACE_SECONDS + 3.5)
    assert deliverer._probes["tracify"].every >= 4  # past the grace: 1 s, then 2, then 4: each look found none due
    found_at = time.monotonic()
    await accept_page(store, sealer, 100, tenant="quiet", token="quiet")
    deadline = time.monotonic() + 3
    while "quiet" not in seen and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert "quiet" in seen  # a new tenant in the counters brings the looks back to once a second
    assert time.monotonic() - found_at < 2.5  # not after the 4 s the slowed looks would have waited
    assert "waiting" not in seen
    hang.set()
    await deliverer.stop(drain_seconds=1)


async def test_a_look_past_the_blocked_tenant_leases_none_of_its_jobs(
        store: SQLiteStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """Another tenant's postbacks wait for their retry time, so the looks past the blocked tenant's backlog find
    nothing due. SQLite passes over the blocked tenant's jobs: a look leases none of them, so none is handed back,
    kept or rendered. Leasing them (up to 1,000 with their payloads, from every share) and handing them back held the
    write lock up to 50 ms at a time with 1,000,000 postbacks of another tenant queued (README, 0.13.18); kept, their
    events were parsed in two processes (README, 0.13.17)."""
    sealer, hang, seen = await loud_backlog_beside_a_waiting_retry(store, monkeypatch), asyncio.Event(), []
    lease, release, steps = store.lease, store.release, []

    async def noting_lease(vendor: str, **kwargs: Any) -> list[Job]:
        jobs = await lease(vendor, **kwargs)
        if kwargs.get("every_share"):
            steps.append(("look", {j.tenant for j in jobs}, frozenset(kwargs.get("skip_tenants", ()))))
        return jobs

    async def noting_release(jobs: list[Job], *, due_at: float) -> None:
        steps.append(("release", {j.tenant for j in jobs}, frozenset()))
        await release(jobs, due_at=due_at)
    monkeypatch.setattr(store, "lease", noting_lease)
    monkeypatch.setattr(store, "release", noting_release)

    deliverer = loud_tenant_hangs(store, sealer, hang, seen)
    render = deliverer._render_one
    rendered: list[str] = []

    def noting_render(job: Job) -> Any:
        rendered.append(job.tenant)
        return render(job)
    monkeypatch.setattr(deliverer, "_render_one", noting_render)
    deliverer.start()
    await asyncio.sleep(2.5)
    looks = [step for step in steps if step[0] == "look"]
    assert looks  # the counters show the waiting tenant: the blocked tenant's backlog was looked past
    assert all(skip == {"loud"} and not tenants for _, tenants, skip in looks)  # ... and none of its jobs leased
    assert not [step for step in steps if step[0] == "release" and "loud" in step[1]]
    assert "waiting" not in seen and "waiting" not in rendered
    hang.set()
    await deliverer.stop(drain_seconds=1)


async def test_a_look_that_finds_nothing_does_not_slow_the_looks_while_others_find_some(
        store: SQLiteStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """With two delivery processes looking past a blocked tenant over every share, one's look may find the other
    tenant's jobs already taken by the other's. One such empty look is no sign that they are not due: the looks
    stay once a second (backing off at once had a quiet tenant's postback wait 2 s in
    tests/test_tenant_isolation_e2e.py); they slow down only after PROBE_GRACE_SECONDS without a find."""
    monkeypatch.setattr(worker, "READY_PER_TENANT", 0)
    monkeypatch.setattr(worker, "READY_MIN", 8)
    sealer, hang = Sealer(SECRET), asyncio.Event()
    for n in range(60):
        await accept_page(store, sealer, n, tenant="loud", token=f"loud-{n}")
    lease, looks = store.lease, []

    async def every_other_taken_elsewhere(vendor: str, **kwargs: Any) -> list[Job]:
        """Every other look finds the quiet tenant's jobs already taken by the other process's look."""
        jobs = await lease(vendor, **kwargs)
        if not kwargs.get("every_share"):
            return jobs
        looks.append(len(looks) % 2 == 1)
        if not looks[-1]:
            return jobs
        await store.complete([j for j in jobs if j.tenant == "quiet"], status=200, now=time.time())
        return [j for j in jobs if j.tenant != "quiet"]
    monkeypatch.setattr(store, "lease", every_other_taken_elsewhere)

    deliverer = loud_tenant_hangs(store, sealer, hang, [])
    deliverer.start()
    paces = []
    for n in range(100, 160):  # a quiet tenant's events keep coming
        await accept_page(store, sealer, n, tenant="quiet", token="quiet")
        await asyncio.sleep(0.1)
        paces.append(deliverer._probes["tracify"].every)
    assert True in looks and len(looks) >= 4  # some looks found nothing: the other process had taken them
    assert max(paces) == worker.PROBE_SECONDS  # and none slowed the looks
    hang.set()
    await deliverer.stop(drain_seconds=1)


@pytest.mark.parametrize("every_vendor", [False, True])
def test_one_parse_serves_every_vendor_and_nothing_is_kept_once_rendered(monkeypatch: pytest.MonkeyPatch,
                                                                         every_vendor: bool) -> None:
    """An Order Completed for all three vendors (four postbacks) is opened and parsed once, and each vendor's
    postbacks built once; they are kept only until the last of them is rendered. Without `every_vendor` the parsed
    event is kept for the other vendors' jobs; with it, the first job builds every vendor's postbacks."""
    from app import stored

    parses: list[str] = []
    builds: list[str] = []
    real_parse, real_built = stored.parse_event, stored._built

    def counting_parse(*args: object, **kwargs: object) -> object:
        parses.append("parse")
        return real_parse(*args, **kwargs)  # type: ignore[arg-type]

    def counting_built(vendor: Any, *args: Any) -> Any:
        builds.append(vendor.slug)
        return real_built(vendor, *args)

    monkeypatch.setattr(stored, "parse_event", counting_parse)
    monkeypatch.setattr(stored, "_built", counting_built)
    sealer = Sealer(SECRET)
    renderer = Renderer(sealer, every_vendor=every_vendor)
    settings = orjson.dumps(resolve(ALL_VENDORS))
    body = (FIXTURES / "segment" / "order_completed.json").read_bytes()
    payload = sealer.seal(pack_event(settings, 1.0, body))
    targets = [("segmentstream", "track"), ("tracify", "events"), ("segmentstream", "data_stream"),
               ("audiohook", "pixel")]
    for vendor, target in targets:
        job = Job(f"{vendor}-{target}", "42", vendor, target, "acme", "m1", "Order Completed", "", payload, 0,
                  1.0, len(payload))
        rendered = renderer.render(job)
        assert isinstance(rendered, EncodedPostback), rendered
        assert (rendered.vendor, rendered.target) == (vendor, target)
    assert parses == ["parse"]
    assert renderer.opened == 1  # counted in segrelay_delivery_events_opened_total
    assert sorted(builds) == ["audiohook", "segmentstream", "tracify"]
    assert not renderer._outcomes  # segmentstream's two postbacks were both rendered; the others kept nothing
    assert renderer._outcome_bytes == 0
    assert bool(renderer._events) is not every_vendor  # the parsed event is kept only for other vendors' jobs


def test_every_vendors_postbacks_are_kept_encoded_until_their_jobs_come_within_a_bound() -> None:
    """With `every_vendor`, an event's first job builds the other vendors' postbacks, byte for byte what their own
    jobs would have built, and keeps them until their jobs come. Beyond the bound none are built ahead (the oldest
    are what the next jobs need); the jobs of the events left out open them again."""
    sealer = Sealer(SECRET)
    settings = orjson.dumps(resolve(ALL_VENDORS))
    body = (FIXTURES / "segment" / "order_completed.json").read_bytes()
    payloads = [sealer.seal(pack_event(settings, 1.0, body)) for _ in range(3)]

    def job(n: int, vendor: str, target: str) -> Job:
        return Job(f"{n}-{vendor}", str(n), vendor, target, "acme", "m1", "Order Completed", "", payloads[n], 0,
                   1.0, len(payloads[n]))
    alone = Renderer(sealer)
    renderer = Renderer(sealer, every_vendor=True)
    renderer.kept_max = 4  # entries: two events' three other postbacks do not fit
    for n in range(3):
        assert renderer.render(job(n, "tracify", "events")) == alone.render(job(n, "tracify", "events"))
    assert [(k[0], k[2]) for k in renderer._outcomes] == [("0", "segmentstream"), ("0", "audiohook"),
                                                          ("1", "segmentstream"), ("1", "audiohook")]
    assert renderer._outcome_bytes == sum(len(p.content) for kept in renderer._outcomes.values()
                                          for p in kept.outcomes if isinstance(p, EncodedPostback))
    for n in (1, 2):  # kept, then left out: built again
        for vendor, target in [("segmentstream", "track"), ("segmentstream", "data_stream"),
                               ("audiohook", "pixel")]:
            assert renderer.render(job(n, vendor, target)) == alone.render(job(n, vendor, target))


def test_postbacks_are_built_ahead_only_while_there_is_room_and_only_for_vendors_still_to_come(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """With `every_vendor`, once the kept postbacks fill their bound no more are built ahead (until 0.13.20 the
    oldest were evicted: under a backlog larger than the bound, exactly those the vendor furthest behind was about to
    take), and none for a vendor that has rendered a later event here or nothing new for STALLED_SECONDS (an outage);
    those kept past KEPT_SECONDS make room."""
    from app import stored

    builds: list[tuple[str, str]] = []
    real_built = stored._built

    def counting_built(vendor: Any, event: Any, settings: Any) -> Any:
        builds.append((event.message_id, vendor.slug))
        return real_built(vendor, event, settings)

    monkeypatch.setattr(stored, "_built", counting_built)
    clock = [1000.0]
    monkeypatch.setattr(stored, "time", SimpleNamespace(monotonic=lambda: clock[0]))
    sealer = Sealer(SECRET)
    settings = orjson.dumps(resolve(ALL_VENDORS))
    document = orjson.loads((FIXTURES / "segment" / "order_completed.json").read_bytes())
    payloads = {n: sealer.seal(pack_event(settings, 1.0, orjson.dumps({**document, "messageId": f"m{n}"})))
                for n in range(1, 6)}

    def job(n: int, vendor: str, target: str) -> Job:
        return Job(f"{n}-{vendor}-{target}", str(n), vendor, target, "acme", f"m{n}", "Order Completed", "",
                   payloads[n], 0, 1.0, len(payloads[n]))
    renderer = Renderer(sealer, every_vendor=True)
    renderer.kept_max = 4  # two events' postbacks of the two vendors behind
    for n in (1, 2, 3):  # Tracify ahead
        assert isinstance(renderer.render(job(n, "tracify", "events")), EncodedPostback)
    assert builds == [("m1", "tracify"), ("m1", "segmentstream"), ("m1", "audiohook"),
                      ("m2", "tracify"), ("m2", "segmentstream"), ("m2", "audiohook"), ("m3", "tracify")]
    assert [(key[0], key[2]) for key in renderer._outcomes] == [
        ("1", "segmentstream"), ("1", "audiohook"), ("2", "segmentstream"), ("2", "audiohook")]
    builds.clear()
    for n in (1, 2):  # SegmentStream's jobs find theirs kept
        for target in ("track", "data_stream"):
            assert isinstance(renderer.render(job(n, "segmentstream", target)), EncodedPostback)
    assert isinstance(renderer.render(job(3, "segmentstream", "track")), EncodedPostback)  # event 3: opened again
    assert builds == [("m3", "segmentstream"), ("m3", "audiohook")]  # not Tracify's: it has rendered event 3
    assert [(key[0], key[2]) for key in renderer._outcomes] == [
        ("1", "audiohook"), ("2", "audiohook"), ("3", "audiohook"), ("3", "segmentstream")]
    builds.clear()
    clock[0] += stored.KEPT_SECONDS + 1  # everything kept so far has waited too long, and no vendor has moved since
    assert isinstance(renderer.render(job(4, "segmentstream", "track")), EncodedPostback)
    assert builds == [("m4", "segmentstream"), ("m4", "tracify"), ("m4", "audiohook")]  # idle vendors, not behind
    assert [(key[0], key[2]) for key in renderer._outcomes] == [
        ("4", "tracify"), ("4", "audiohook"), ("4", "segmentstream")]
    builds.clear()
    clock[0] += stored.STALLED_SECONDS / 2  # SegmentStream moved since; Audiohook has rendered nothing at all
    monkeypatch.setattr(stored, "STALLED_LEAD", 0)  # as if the events had gone far ahead of Audiohook (an outage)
    assert isinstance(renderer.render(job(5, "tracify", "events")), EncodedPostback)
    assert builds == [("m5", "tracify"), ("m5", "segmentstream")]  # Audiohook has stalled; SegmentStream moved


def test_another_vendors_failing_build_is_left_to_that_vendors_own_job() -> None:
    """With `every_vendor`, a vendor whose postbacks cannot be built from the stored event (its token missing from
    the stored settings) does not stop the others'; its own job meets the error, and is dead-lettered with it."""
    sealer = Sealer(SECRET)
    settings = orjson.dumps({"tracifyCustomerSiteId": SITE, "audiohookId": AUDIOHOOK_ID})  # no tracify token
    body = orjson.dumps({"type": "page", "messageId": "m1", "anonymousId": "a", "context": {
        "ip": "1.2.3.4", "userAgent": "UA", "page": {"url": "https://shop.example/p"}}})
    payload = sealer.seal(pack_event(settings, 1.0, body))
    renderer = Renderer(sealer, every_vendor=True)
    pixel = renderer.render(Job("1", "9", "audiohook", "pixel", "acme", "m1", "page", "", payload, 0, 1.0, 1))
    assert isinstance(pixel, EncodedPostback)
    with pytest.raises(KeyError):
        renderer.render(Job("2", "9", "tracify", "events", "acme", "m1", "page", "k", payload, 0, 1.0, 1))


def test_the_parsed_events_kept_are_bounded_by_their_bodies_bytes() -> None:
    sealer = Sealer(SECRET)
    settings = orjson.dumps(resolve({"audiohookId": "9b2f7c3a-1d4e-4f5a-8b6c-7d8e9f0a1b2c"}))
    bodies = [orjson.dumps({"type": "page", "messageId": f"m{n}", "anonymousId": "a", "context": {
        "ip": "1.2.3.4", "userAgent": "UA", "page": {"url": f"https://shop.example/p{n}"}}})
              for n in range(10, 16)]
    renderer = Renderer(sealer, body_bytes=3 * len(bodies[0]))
    for n, body in enumerate(bodies):
        job = Job(str(n), str(n), "audiohook", "pixel", "acme", f"m{n}", "page", "",
                  sealer.seal(pack_event(settings, 1.0, body)), 0, 1.0, 100)
        assert isinstance(renderer.render(job), EncodedPostback)
    assert [key[0] for key in renderer._events] == ["3", "4", "5"]  # the three most recent
    assert renderer._event_bytes == 3 * len(bodies[0])


async def accept_audiohook_pages(store: SQLiteStore, sealer: Sealer, count: int) -> None:
    """Page views for Audiohook (one job each, no batches), stored the way the accept path stores them."""
    settings = resolve({"audiohookId": AUDIOHOOK_ID})
    now = time.time()
    for n in range(count):
        body = orjson.dumps({"type": "page", "messageId": f"p{n}", "anonymousId": "a", "context": {
            "ip": "203.0.113.7", "userAgent": "UA", "page": {"url": f"https://shop.example/p{n}"}}})
        assert await store.accept("acme", f"p{n}", sealer.seal(pack_event(orjson.dumps(settings), now, body)),
                                  [NewJob("audiohook", "pixel", "page", "")], now=now, ttl=60)


async def test_postbacks_are_rendered_as_they_are_leased_and_go_with_a_job_handed_back(
        store: SQLiteStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every leased job's postback is rendered before the first request leaves (one after the other, not between
    requests); the renderings of jobs handed back unsent are not kept."""
    sealer = Sealer(SECRET)
    await accept_audiohook_pages(store, sealer, 20)
    renders: list[str] = []
    original = Renderer.render

    def counting(self: Renderer, job: Job) -> object:
        renders.append(job.message_id)
        return original(self, job)
    monkeypatch.setattr(Renderer, "render", counting)
    rendered_before_first_request: list[int] = []
    hold = asyncio.Event()

    async def transport(vendor: str, request: OutgoingRequest) -> VendorAnswer:
        rendered_before_first_request.append(len(renders))
        await hold.wait()  # never answers: the other jobs wait in the ready list
        return VendorAnswer(200, b"")
    deliverer = Deliverer(Config(secret=SECRET, vendor_concurrency=2, tenant_concurrency=1,
                                 vendor_urls={"audiohook": "http://ah", "segmentstream": "http://ss",
                                              "tracify": "http://tr"}), store, sealer, transport=transport)
    deliverer.start()
    assert await asyncio.wait_for(_until(lambda: len(rendered_before_first_request) >= 1), 5)
    assert rendered_before_first_request[0] == 20  # all leased, all rendered, before any request went out
    assert sorted(renders) == sorted(f"p{n}" for n in range(20))
    await deliverer.stop(drain_seconds=0.1)
    assert all(not rendered for rendered in deliverer._rendered.values())
    assert len(await store.lease("audiohook", now=time.time() + 1, limit=100, lease_seconds=60)) == 20  # handed back


async def _until(check: Callable[[], bool]) -> bool:
    while not check():
        await asyncio.sleep(0.01)
    return True


async def test_a_lease_takes_at_most_lease_max_jobs_even_for_a_batched_vendor(store: SQLiteStore) -> None:
    """A lease holds SQLite's write lock while it reads and updates its rows (every accept waits for it): Tracify's
    ready list, a thousand jobs deep for requests of 100, fills in several leases of at most LEASE_MAX."""
    sealer = Sealer(SECRET)
    for n in range(600):
        await accept_page(store, sealer, n)
    limits: list[int] = []
    lease = store.lease

    async def spied(vendor: str, *, now: float, limit: int, lease_seconds: float, **more: object) -> list[Job]:
        limits.append(limit)
        return await lease(vendor, now=now, limit=limit, lease_seconds=lease_seconds)

    store.lease = spied  # type: ignore[method-assign]
    deliverer = Deliverer(config(), store, sealer, transport=answering(200, b'{"status": true}'))
    await run_until(deliverer, lambda: _all_sent(store))
    assert limits and max(limits) <= worker.LEASE_MAX < 600
    assert sum((await store.counts()).pending.values()) == 0


async def _all_sent(store: SQLiteStore) -> bool:
    return sum((await store.counts()).pending.values()) == 0
