"""One tenant's flood, broken token and hanging endpoint do not raise another tenant's latency or 503 rate."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections import Counter

import httpx

from tests.support import SITE_ID, Segrelay, VendorStub, basic, fixture, settings_header, wait_until


def test_a_flooding_tenant_with_a_broken_endpoint_leaves_the_quiet_tenant_untouched(
        fresh_stub: VendorStub, make_server: type[Segrelay]) -> None:
    loud_hook, quiet_hook = str(uuid.uuid4()), str(uuid.uuid4())
    fresh_stub.script(f"/audiohook/{loud_hook}", [], default={"status": 200, "delay": 4})  # hangs
    service = make_server({"SEGRELAY_MAX_QUEUE_MB": "0.4", "SEGRELAY_TENANT_QUEUE_SHARE": "0.5",
                           "SEGRELAY_TENANT_CONCURRENCY": "4", "SEGRELAY_VENDOR_CONCURRENCY": "8"}).start()
    quiet_key = service.create_key(tenant="quiet")
    loud = {"audiohookId": loud_hook, "tracifyApiToken": "loud-token", "tracifyCustomerSiteId": SITE_ID}
    quiet = {"audiohookId": quiet_hook, "tracifyApiToken": "quiet-token", "tracifyCustomerSiteId": SITE_ID}

    # A token that cannot travel in a header is refused before anything is stored.
    broken = service.post(fixture("order_completed.json"), {**loud, "tracifyApiToken": "tok\r\nX-A: 1"})
    assert broken.status_code == 400 and "tracifyApiToken" in broken.json()["message"]

    loud_answers: Counter[int] = Counter()
    sent: dict[str, float] = {}
    quiet_answers: Counter[int] = Counter()

    def flood() -> None:
        with httpx.Client(timeout=10) as client:
            for _ in range(400):
                event = {**fixture("order_completed.json"), "messageId": f"loud-{uuid.uuid4()}"}
                response = client.post(service.url + "/segment", content=json.dumps(event), headers={
                    "Authorization": basic(service.key), "X-Segment-Settings": settings_header(loud)})
                loud_answers[response.status_code] += 1

    flooders = [threading.Thread(target=flood) for _ in range(4)]
    for thread in flooders:
        thread.start()
    assert wait_until(lambda: loud_answers[503] > 0, 30)  # the loud tenant is past its share
    with httpx.Client(timeout=10) as client:
        for n in range(20):
            order_id = f"quiet-{n}-{uuid.uuid4().hex[:8]}"
            event = {**fixture("order_completed.json"), "messageId": order_id,
                     "properties": {**fixture("order_completed.json")["properties"], "order_id": order_id}}
            response = client.post(service.url + "/segment", content=json.dumps(event), headers={
                "Authorization": basic(quiet_key), "X-Segment-Settings": settings_header(quiet)})
            quiet_answers[response.status_code] += 1
            sent[order_id] = time.time()
            time.sleep(0.05)
    for thread in flooders:
        thread.join(120)

    def quiet_delivered() -> dict[str, float]:
        arrived: dict[str, float] = {}
        for request in fresh_stub.requests(f"/audiohook/{quiet_hook}"):
            order_id = json.loads(request["body"]).get("order_id")
            if order_id in sent:
                arrived.setdefault(order_id, request["at"])
        return arrived
    assert wait_until(lambda: len(quiet_delivered()) == len(sent), 30), service.cli("queue", "stats").stdout
    latencies = sorted(quiet_delivered()[o] - sent[o] for o in sent)
    figures = {"loud_answers": dict(loud_answers), "quiet_answers": dict(quiet_answers),
               "quiet_audiohook_latency_p50_s": round(latencies[len(latencies) // 2], 3),
               "quiet_audiohook_latency_max_s": round(latencies[-1], 3)}
    print(f"\ntenant isolation: {json.dumps(figures)}")
    assert quiet_answers == Counter({202: 20})  # not one 503 for the quiet tenant
    assert loud_answers[503] > 0 and loud_answers[202] > 0
    assert latencies[-1] < 2.0  # the loud tenant's 4-second hangs never held the quiet tenant's postbacks
