"""This worker's pod-deletion-cost: high while it holds a job, low while idle, so that a scale-down removes idle pods.

When KEDA (through the HorizontalPodAutoscaler) lowers a pool's replicas, the ReplicaSet controller deletes the pods
with the lowest `controller.kubernetes.io/pod-deletion-cost` first (Kubernetes 1.22+, on by default). Without the
annotation it picks by its own criteria, which may well be a pod in the middle of a ten-minute video.

One small JSON merge patch on the worker's own pod, sent with the pod's service account token: httpx, which
k5serve already depends on, instead of the Kubernetes client library (a large dependency for one PATCH). The
patch is sent from a thread of its own, so a slow or unreachable API server never delays a job, and a failure is
logged and tried again on the next change or heartbeat; it never fails a job. Outside a cluster (no pod name in
the settings, no service account token) nothing is sent.
"""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path

import httpx

from service.contract.settings import Settings

log = logging.getLogger(__name__)

ANNOTATION = "controller.kubernetes.io/pod-deletion-cost"
# Any int32; only the order matters. Idle pods at 0, the default of pods without the annotation.
BUSY_COST, IDLE_COST = 10_000, 0
SERVICE_ACCOUNT = Path("/var/run/secrets/kubernetes.io/serviceaccount")


class PodCost(threading.Thread):
    """Keeps the annotation equal to the last state `set_busy` was given."""

    def __init__(
        self, api_url: str, namespace: str, pod: str, token: Path, ca: Path | None, timeout_s: float = 5.0
    ) -> None:
        super().__init__(name="k5-pod-cost", daemon=True)
        self.url = f"{api_url.rstrip('/')}/api/v1/namespaces/{namespace}/pods/{pod}"
        self.token, self.ca, self.timeout_s = token, ca, timeout_s
        self._wanted: bool | None = None
        self._sent: bool | None = None
        self._changed = threading.Event()
        self._lock = threading.Lock()
        self.stopped = threading.Event()
        self._client: httpx.Client | None = None  # one for the thread: its TLS context is built once

    @classmethod
    def from_settings(cls, settings: Settings, service_account: Path = SERVICE_ACCOUNT) -> PodCost | None:
        """None outside a cluster: no pod name given, or no service account token mounted."""
        token = service_account / "token"
        if not (settings.pod_name and settings.pod_namespace) or not token.exists():
            return None
        ca = service_account / "ca.crt"
        return cls(settings.kube_api_url, settings.pod_namespace, settings.pod_name, token, ca if ca.exists() else None)

    def set_busy(self, busy: bool) -> None:
        """Never blocks: the thread sends the patch if the state differs from what was last sent."""
        with self._lock:
            self._wanted = busy
            if busy != self._sent:
                self._changed.set()

    def stop(self) -> None:
        self.stopped.set()
        self._changed.set()

    def run(self) -> None:
        while True:
            self._changed.wait()
            if self.stopped.is_set():
                return
            with self._lock:
                self._changed.clear()
                wanted = self._wanted
            if wanted is None or wanted == self._sent:
                continue
            try:
                self.patch(BUSY_COST if wanted else IDLE_COST)
                with self._lock:
                    self._sent = wanted
                    # A change asked for while this patch was in flight compared itself with the old _sent and
                    # may have found nothing to do: look again rather than lose it.
                    if self._wanted != wanted:
                        self._changed.set()
            except Exception:  # noqa: BLE001 - never a job's concern: the next set_busy (a heartbeat) tries again
                log.warning("could not set the pod's deletion cost", extra={"busy": wanted}, exc_info=True)

    def patch(self, cost: int) -> None:
        # Read each time: the kubelet rotates projected service account tokens.
        headers = {
            "Authorization": f"Bearer {self.token.read_text().strip()}",
            "Content-Type": "application/merge-patch+json",
        }
        body = {"metadata": {"annotations": {ANNOTATION: str(cost)}}}
        if self._client is None:
            verify: str | bool = str(self.ca) if self.ca is not None else True
            self._client = httpx.Client(verify=verify, timeout=self.timeout_s)
        resp = self._client.patch(self.url, content=json.dumps(body).encode(), headers=headers)
        resp.raise_for_status()
        log.info("pod deletion cost set", extra={"cost": cost})
