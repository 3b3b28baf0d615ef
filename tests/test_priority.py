"""The interactive lane: every worker of a model takes interactive jobs before batch ones, in order within each
lane; queue positions count both lanes; a key's ceiling, set by the operator, bounds what it may ask for. The
gateway in-process against a real Redis."""

from __future__ import annotations

from fastapi.testclient import TestClient

from service.contract.jobs import JobStore, video_id_of
from service.contract.models import TINY
from service.contract.settings import Settings
from service.gateway.app import create_app
from tests.test_security import ALICE, BOB, auth

SPEC = TINY["k5-tiny-t2v"]


def test_interactive_jobs_go_ahead_of_batch_ones_up_to_the_keys_ceiling(r, redis_server, tmp_path):
    settings = Settings(
        redis_url=redis_server.url.replace("/0", "/1"),
        storage_url=f"file://{tmp_path}/store",
        api_keys=[ALICE, f"{BOB} priority=batch"],
        heartbeat_s=3600,
    )
    store = JobStore(r, settings)
    store.announce(SPEC, "w")
    with TestClient(create_app(settings)) as c:

        def post(key: str, **extra: str) -> dict:
            answer = c.post("/v1/videos", json={"prompt": "a lighthouse", **extra}, headers=auth(key))
            assert answer.status_code == 200, answer.text
            return answer.json()

        b1 = post(BOB)  # the key's ceiling is its default lane
        a1 = post(ALICE, priority="batch")
        i1 = post(ALICE)
        b2 = post(BOB, priority="batch")
        i2 = post(ALICE, priority="interactive")
        assert [v["priority"] for v in (b1, a1, i1, b2, i2)] == [
            "batch",
            "batch",
            "interactive",
            "batch",
            "interactive",
        ]

        refused = c.post("/v1/videos", json={"prompt": "x", "priority": "interactive"}, headers=auth(BOB))
        assert refused.status_code == 400
        assert refused.json()["error"]["param"] == "priority"
        assert refused.json()["error"]["code"] == "priority_not_allowed"
        invalid = c.post("/v1/videos", json={"prompt": "x", "priority": "urgent"}, headers=auth(ALICE))
        assert invalid.status_code == 400 and invalid.json()["error"]["param"] == "priority"

        expected = [i1["id"], i2["id"], b1["id"], a1["id"], b2["id"]]
        # The order every worker of the model takes them in: RQ's list, from the head.
        assert [video_id_of(j) for j in store.queue(SPEC.id).get_job_ids()] == expected
        positions = {}
        for key in (ALICE, BOB):
            for v in c.get("/v1/videos", headers=auth(key)).json()["data"]:
                positions[v["id"]] = v["queue_position"]
        assert positions == {video_id: n for n, video_id in enumerate(expected)}
