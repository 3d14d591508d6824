"""Leader election on a coordination.k8s.io/v1 Lease, as client-go's leaderelection does it: the holder
renews the Lease every retry period; another replica takes it only when it has seen no renewal for a whole
lease duration (by its own clock: no trust in the holder's), and every write names the resourceVersion it
was computed from, so two replicas racing for an expired Lease cannot both win (the loser gets 409). A
holder that cannot renew within the renew deadline stops acting; one that stops cleanly releases the Lease
so a standby takes over at once."""

from __future__ import annotations

import datetime
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

from bpflb.kubeapi import ApiError, KubeClient, KubeObject, resource_path

log = logging.getLogger("bpflb.leader")

LEASE_NAME = "bpflb-operator"
LEASE_DURATION = 15.0        # client-go's defaults
RENEW_DEADLINE = 10.0
RETRY_PERIOD = 2.0


def _micro_time(at: datetime.datetime | None = None) -> str:
    """A Kubernetes MicroTime."""
    return (at or datetime.datetime.now(tz=datetime.UTC)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass(frozen=True)
class LeaseTimes:
    duration: float = LEASE_DURATION
    renew_deadline: float = RENEW_DEADLINE
    retry_period: float = RETRY_PERIOD

    def __post_init__(self) -> None:
        if not 0 < self.retry_period < self.renew_deadline < self.duration:
            raise ValueError(f"leader election: need retry period < renew deadline < lease duration; got "
                             f"{self.retry_period}s, {self.renew_deadline}s, {self.duration}s")


class LeaseElector:
    """One candidate for the Lease namespace/name under identity."""

    def __init__(self, client: KubeClient, namespace: str, identity: str, *, name: str = LEASE_NAME,
                 times: LeaseTimes | None = None) -> None:
        self.client = client
        self.namespace = namespace
        self.name = name
        self.identity = identity
        self.times = times or LeaseTimes()
        self.path = resource_path("coordination.k8s.io/v1", "leases", namespace, name)
        self._observed: tuple[Any, ...] | None = None     # (holder, renewTime, transitions) last seen
        self._observed_at = 0.0                           # when it last changed, by our monotonic clock
        self.last_renew = 0.0                             # monotonic time of our last successful write
        self.holder: str | None = None                    # who held it when last looked at
        self._lock = threading.Lock()                     # an attempt still running when release() comes
        self._released = False

    @property
    def leading(self) -> bool:
        """We hold the Lease and renewed it within the renew deadline."""
        return self.holder == self.identity and time.monotonic() - self.last_renew < self.times.renew_deadline

    def _spec(self, acquire: str, transitions: int) -> dict[str, Any]:
        return {"holderIdentity": self.identity, "leaseDurationSeconds": max(1, round(self.times.duration)),
                "acquireTime": acquire, "renewTime": _micro_time(), "leaseTransitions": transitions}

    def try_acquire_or_renew(self) -> bool:
        """One attempt: True when we hold the Lease now (created, taken over or renewed). Never after
        release()."""
        with self._lock:
            if self._released:
                return False
            try:
                lease = self.client.get(self.path)
                if lease is None:
                    return self._create()
                return self._update(lease)
            except ApiError as exc:
                if exc.status != 409:
                    log.warning("leader election: Lease %s/%s: %s", self.namespace, self.name, exc)
                return False

    def _create(self) -> bool:
        spec = self._spec(_micro_time(), 0)
        self.client.create(resource_path("coordination.k8s.io/v1", "leases", self.namespace), {
            "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
            "metadata": {"name": self.name, "namespace": self.namespace}, "spec": spec})
        self._won(spec, taken_from=None)
        return True

    def _update(self, lease: KubeObject) -> bool:
        spec = lease.get("spec") or {}
        holder = spec.get("holderIdentity") or None
        seen = (holder, spec.get("renewTime"), spec.get("leaseTransitions"))
        if seen != self._observed:
            self._observed, self._observed_at = seen, time.monotonic()
        self.holder = holder
        duration = float(spec.get("leaseDurationSeconds") or self.times.duration)
        if holder and holder != self.identity and time.monotonic() - self._observed_at < duration:
            return False                          # someone else holds it and renews it
        ours = holder == self.identity
        transitions = int(spec.get("leaseTransitions") or 0) + (0 if ours else 1)
        acquired = spec.get("acquireTime") if ours else None
        new = self._spec(str(acquired) if acquired else _micro_time(), transitions)
        self.client.merge_patch(self.path, {
            "metadata": {"resourceVersion": (lease.get("metadata") or {}).get("resourceVersion")}, "spec": new})
        self._won(new, taken_from=None if ours else (holder or "(released)"))
        return True

    def _won(self, spec: dict[str, Any], taken_from: str | None) -> None:
        if self.holder != self.identity:
            log.info("leader election: %s now holds Lease %s/%s%s", self.identity, self.namespace, self.name,
                     f" (after {taken_from})" if taken_from else "")
        self.holder = self.identity
        self.last_renew = time.monotonic()
        self._observed = (self.identity, spec["renewTime"], spec["leaseTransitions"])
        self._observed_at = self.last_renew

    def release(self) -> None:
        """Give the Lease up (a clean stop): a standby takes it at its next attempt. No attempt after this."""
        with self._lock:
            self._released = True
            if self.holder == self.identity:
                self._release()

    def _release(self) -> None:
        try:
            lease = self.client.get(self.path)
            if lease is None or (lease.get("spec") or {}).get("holderIdentity") != self.identity:
                return
            self.client.merge_patch(self.path, {
                "metadata": {"resourceVersion": (lease.get("metadata") or {}).get("resourceVersion")},
                "spec": {"holderIdentity": None, "leaseDurationSeconds": 1, "renewTime": _micro_time()}})
            log.info("leader election: %s released Lease %s/%s", self.identity, self.namespace, self.name)
        except ApiError as exc:
            log.warning("leader election: could not release Lease %s/%s: %s (a standby takes it once it "
                        "expires)", self.namespace, self.name, exc)
        self.holder = None
