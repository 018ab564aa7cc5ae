"""Leader election on a coordination.k8s.io Lease, as client-go's leaderelection does it.

Only the leader reports ready and serves ext_proc (the server wires `on_change`).
A candidate takes the lease when its holder is empty or has not renewed it for the
lease duration, measured on the candidate's own clock from when it last saw the
record change (so clock skew between pods does not matter). The leader renews every
retry period and steps down if it could not renew within the renew deadline. On a
clean stop the leader releases the lease so a follower takes over at once.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import math
import os
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime

import orjson
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from epp.discovery.kubeclient import (
    CONNECT_TIMEOUT,
    Resource,
    api_request,
    describe_api_error,
    load_api_client,
    resource_path,
)
from epp.options import Options, parse_duration

log = logging.getLogger("epp.discovery.leader")

LEASES = Resource("coordination.k8s.io", "v1", "leases")
LEASE_VERBS = ("get", "create", "update")  # what this module calls; RBAC is derived from it


def _env_duration(name: str, default: float) -> float:
    text = os.environ.get(name)
    return parse_duration(text) if text else default


def lease_name(options: Options) -> str:
    return f"{options.pool_name}-epp-leader" if options.pool_name else "epp-leader"


def lease_namespace(options: Options) -> str:
    return options.pool_namespace or os.environ.get("NAMESPACE") or "default"


def _micro_time() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class LeaderElector:
    def __init__(self, options: Options, identity: str, on_change: Callable[[bool], object] | None = None, *,
                 lease_duration: float | None = None, renew_deadline: float | None = None,
                 retry_period: float | None = None, name: str | None = None,
                 api: client.ApiClient | None = None) -> None:
        self.options = options
        self.identity = identity
        self.on_change = on_change
        # Defaults as the reference: 15s / 10s / 2s; env vars let a test or an operator shorten them.
        self.lease_duration = lease_duration or _env_duration("EPP_LEASE_DURATION", 15.0)
        self.renew_deadline = renew_deadline or _env_duration("EPP_LEASE_RENEW_DEADLINE", 10.0)
        self.retry_period = retry_period or _env_duration("EPP_LEASE_RETRY_PERIOD", 2.0)
        if not self.retry_period < self.renew_deadline < self.lease_duration:
            raise ValueError("leader election: need retry period < renew deadline < lease duration")
        self.name = name or lease_name(options)
        self.namespace = lease_namespace(options)
        self._api = api
        self._owns_api = api is None
        self._is_leader = False
        self._stop = threading.Event()
        self._release = True
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._observed: tuple | None = None  # last lease record seen
        self._observed_at = 0.0
        self._last_renew = 0.0

    @property
    def is_leader(self) -> bool:
        return self._is_leader

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        if self._api is None:
            self._api = await asyncio.to_thread(load_api_client, self.options.kubeconfig)
        self._thread = threading.Thread(target=self._run, name=f"leader-{self.name}", daemon=True)
        self._thread.start()

    async def stop(self, release: bool = True) -> None:
        """Stop campaigning; the leader releases the lease unless `release` is False
        (then followers take over only after it expires, as after a crash)."""
        self._release = release
        self._stop.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, self.renew_deadline + 5)
        if self._is_leader:
            self._set_leader(False)
        if self._owns_api and self._api is not None:
            self._api.close()
            self._api = None

    # ------------------------------------------------------------------ thread side
    def _run(self) -> None:
        while not self._stop.is_set():
            ok = self._try_acquire_or_renew()
            now = time.monotonic()
            if ok:
                self._last_renew = now
                if not self._is_leader:
                    log.info("leader election: %s became the leader (lease %s/%s)", self.identity,
                             self.namespace, self.name)
                    self._set_leader(True)
            elif self._is_leader and now - self._last_renew > self.renew_deadline:
                log.warning("leader election: %s could not renew lease %s within %.1fs; stepping down",
                            self.identity, self.name, self.renew_deadline)
                self._set_leader(False)
            self._stop.wait(self.retry_period)
        if self._is_leader and self._release:
            self._release_lease()

    def _set_leader(self, value: bool) -> None:
        self._is_leader = value
        if self.on_change is None or self._loop is None:
            return

        def notify() -> None:
            result = self.on_change(value)
            if inspect.isawaitable(result):
                asyncio.ensure_future(result)

        try:
            self._loop.call_soon_threadsafe(notify)
        except RuntimeError:  # loop closed
            pass

    def _lease_call(self, method: str, body: dict | None = None) -> dict:
        name = "" if method == "POST" else self.name
        resp = api_request(self._api, method, resource_path(LEASES, self.namespace, name), body=body,
                           timeout=self._timeout())
        try:
            return orjson.loads(resp.data)
        finally:
            resp.release_conn()

    def _timeout(self) -> tuple[float, float]:
        t = min(CONNECT_TIMEOUT, self.renew_deadline / 2)
        return (t, t)

    def _try_acquire_or_renew(self) -> bool:
        verb = "get"
        try:
            try:
                lease = self._lease_call("GET")
            except ApiException as e:
                if e.status != 404:
                    raise
                verb = "create"
                return self._create()
            spec = lease.get("spec") or {}
            holder = spec.get("holderIdentity") or ""
            record = (holder, spec.get("renewTime"), spec.get("acquireTime"), spec.get("leaseTransitions"))
            now = time.monotonic()
            if record != self._observed:
                self._observed, self._observed_at = record, now
            duration = spec.get("leaseDurationSeconds") or self.lease_duration
            if holder and holder != self.identity and now < self._observed_at + duration:
                return False
            verb = "update"
            stamp = _micro_time()
            if holder != self.identity:
                spec["acquireTime"] = stamp
                spec["leaseTransitions"] = int(spec.get("leaseTransitions") or 0) + (1 if holder else 0)
            spec.update(holderIdentity=self.identity, leaseDurationSeconds=math.ceil(self.lease_duration),
                        renewTime=stamp)
            lease["spec"] = spec
            self._lease_call("PUT", lease)
            return True
        except ApiException as e:
            if e.status == 409:  # another candidate wrote first
                return False
            log.warning("leader election: %s", describe_api_error(e, verb, LEASES, self.namespace))
            return False
        except Exception as e:  # noqa: BLE001 - network errors: keep campaigning
            log.warning("leader election: %s lease %s: %s: %s", verb, self.name, type(e).__name__, e)
            return False

    def _create(self) -> bool:
        stamp = _micro_time()
        body = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                "metadata": {"name": self.name, "namespace": self.namespace},
                "spec": {"holderIdentity": self.identity, "leaseDurationSeconds": math.ceil(self.lease_duration),
                         "acquireTime": stamp, "renewTime": stamp, "leaseTransitions": 0}}
        self._lease_call("POST", body)
        return True

    def _release_lease(self) -> None:
        """Empty the holder so a follower need not wait for the lease to expire."""
        try:
            lease = self._lease_call("GET")
            spec = lease.get("spec") or {}
            if spec.get("holderIdentity") != self.identity:
                return
            spec.update(holderIdentity="", leaseDurationSeconds=1, renewTime=_micro_time())
            self._lease_call("PUT", lease)
            log.info("leader election: %s released lease %s", self.identity, self.name)
        except Exception as e:  # noqa: BLE001 - best effort; the lease expires anyway
            log.warning("leader election: could not release lease %s: %s", self.name, e)
