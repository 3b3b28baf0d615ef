"""worker/podcost.py against a real HTTP server standing in for the Kubernetes API server (no cluster here): the
PATCH it sends, that it sends only changes, that a failure is retried on the next call, and that it does nothing
outside a cluster."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from service.contract.settings import Settings
from tests.waiting import wait_until
from worker.podcost import ANNOTATION, BUSY_COST, IDLE_COST, PodCost


class ApiServer(ThreadingHTTPServer):
    """Records every PATCH; answers 503 to the first `fail` of them."""

    def __init__(self, fail: int = 0) -> None:
        self.patches: list[tuple[str, dict, dict]] = []
        self.fail = fail
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_PATCH(self) -> None:  # noqa: N802 - http.server's naming
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if server.fail:
                    server.fail -= 1
                    self.send_response(503)
                else:
                    server.patches.append((self.path, dict(self.headers), body))
                    self.send_response(200)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"{}")

            def log_message(self, *args: object) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def costs(self) -> list[str]:
        return [body["metadata"]["annotations"][ANNOTATION] for _, _, body in self.patches]


@pytest.fixture
def account(tmp_path):
    (tmp_path / "token").write_text("tok-123\n")
    return tmp_path


def pod_cost(api: ApiServer, account) -> PodCost:
    settings = Settings(pod_name="k5-worker-lite-abc", pod_namespace="k5serve", kube_api_url=api.url)
    pod = PodCost.from_settings(settings, service_account=account)
    assert pod is not None
    pod.start()
    return pod


def test_patches_its_own_pod_on_each_change_only(account):
    api = ApiServer()
    pod = pod_cost(api, account)
    try:
        pod.set_busy(True)
        wait_until(lambda: len(api.patches) == 1, 10, "the busy patch")
        path, headers, body = api.patches[0]
        assert path == "/api/v1/namespaces/k5serve/pods/k5-worker-lite-abc"
        assert headers["Authorization"] == "Bearer tok-123"
        assert headers["Content-Type"] == "application/merge-patch+json"
        assert body == {"metadata": {"annotations": {ANNOTATION: str(BUSY_COST)}}}
        pod.set_busy(False)
        pod.set_busy(False)  # a heartbeat repeating the state sends nothing
        wait_until(lambda: len(api.patches) == 2, 10, "the idle patch")
        pod.set_busy(True)
        wait_until(lambda: len(api.patches) == 3, 10, "busy again")
        assert api.costs() == [str(BUSY_COST), str(IDLE_COST), str(BUSY_COST)]
    finally:
        pod.stop()
        api.shutdown()


def test_a_failed_patch_is_sent_again_on_the_next_heartbeat(account):
    api = ApiServer(fail=1)
    pod = pod_cost(api, account)
    try:
        pod.set_busy(True)  # answered 503: logged, and never raised to the caller
        wait_until(lambda: api.fail == 0, 10, "the failing attempt")
        wait_until(lambda: pod._changed.is_set() is False, 10, "the attempt over")
        pod.set_busy(True)  # the next heartbeat, same state: sent again since it never got through
        wait_until(lambda: api.costs() == [str(BUSY_COST)], 10, "the retried patch")
    finally:
        pod.stop()
        api.shutdown()


def test_nothing_is_sent_outside_a_cluster(tmp_path, account):
    assert PodCost.from_settings(Settings(), service_account=account) is None  # no pod name: not in a cluster
    named = Settings(pod_name="p", pod_namespace="ns")
    assert PodCost.from_settings(named, service_account=tmp_path / "none") is None  # no token mounted


def test_the_heartbeat_marks_the_pod_busy_while_the_worker_holds_a_run(r, account, tmp_path):
    from service.contract.jobs import JobStore, plan_job
    from service.contract.lifecycle import Lifecycle
    from service.contract.models import TINY
    from service.contract.schemas import VideoCreate
    from service.contract.storage import open_storage
    from worker import runner
    from worker.main import Heartbeat

    spec = TINY["k5-tiny-t2v"]
    settings = Settings(heartbeat_s=0.05, storage_url=f"file://{tmp_path / 'store'}")
    store = JobStore(r, settings)
    api = ApiServer()
    pod = pod_cost(api, account)
    ctx = runner.WorkerContext(store, open_storage(settings), None, "w1", 3600, pod=pod)
    beat = Heartbeat(store, spec, "w1", settings.heartbeat_s, ctx, ctx.storage)
    beat.start()
    try:
        wait_until(lambda: api.costs() == [str(IDLE_COST)], 10, "idle at the first beat")
        rec = plan_job(VideoCreate(prompt="a fox"), spec, has_image=False)
        Lifecycle(store).create(rec)
        ctx.current = Lifecycle(store).start(rec.id, "w1", rec.id)  # what JobRun.run does at a job's start
        wait_until(lambda: api.costs()[-1:] == [str(BUSY_COST)], 10, "busy while the run is held")
        ctx.current = None
        wait_until(lambda: api.costs() == [str(IDLE_COST), str(BUSY_COST), str(IDLE_COST)], 10, "idle again")
    finally:
        beat.stopped.set()
        pod.stop()
        api.shutdown()
