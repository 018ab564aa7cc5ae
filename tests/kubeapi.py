"""A small Kubernetes API server stand-in for tests (aiohttp, plain HTTP on 127.0.0.1).

Implements what the picker uses, with the real API server's wire shapes:
- list and watch (`?watch=true&resourceVersion=N`) of namespaced pods and custom
  resources, one global resourceVersion counter, `fieldSelector=metadata.name=X`,
  BOOKMARK events when asked, `410 Gone` for a watch from a compacted version;
- get/create/update of coordination.k8s.io Leases with optimistic concurrency (409);
- fault injection: drop every open watch stream, answer 403 for a (verb, resource),
  fail the next N requests with a status, send an in-stream 410 ERROR event;
- an audit log of (verb, group, resource) for every request, so tests can derive the
  RBAC the picker really needs;
- API discovery (`GET /apis/<group>/<version>`, an APIResourceList) of the CRDs
  `installed` (llm-d.ai/v1alpha2 only after install_llmd_crds(), as on a cluster that
  has not installed them); discovery is a non-resource URL, so it is not audited.

It runs on its own thread and event loop, so sync and async tests can both drive it;
every mutating method is thread-safe.
"""

from __future__ import annotations

import asyncio
import copy
import itertools
import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

from devstack.launch import free_port

TOKEN = "stand-in-token"
LEASE_GROUP = "coordination.k8s.io"


def _now_rfc3339() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


@dataclass
class _Watcher:
    key: tuple[str, str]  # (group, plural)
    namespace: str
    name: str | None  # fieldSelector metadata.name
    queue: asyncio.Queue
    response: web.StreamResponse | None = None


@dataclass
class _Event:
    rv: int
    type: str
    namespace: str
    obj: dict


@dataclass
class _Store:
    objects: dict[tuple[str, str], dict] = field(default_factory=dict)  # (ns, name) -> obj
    history: list[_Event] = field(default_factory=list)
    compacted_rv: int = 0  # watches from a version below this get 410


class KubeApiStandIn:
    def __init__(self, token: str = TOKEN) -> None:
        self.token = token
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._lock = threading.RLock()
        self._rv = itertools.count(100)
        self._last_rv = 99
        self._stores: dict[tuple[str, str], _Store] = {}
        self._watchers: list[_Watcher] = []
        self._forbidden: set[tuple[str, str]] = set()  # (verb, resource)
        self._fail_next: list[int] = []
        self.audit: list[tuple[str, str, str]] = []  # (verb, group, resource)
        self.watch_starts: list[tuple[str, str]] = []  # (resource, resourceVersion) of each watch
        self.review_users: dict[str, dict] = {}  # TokenReview: token -> user {username, uid, groups}
        self.metrics_readers: set[str] = set()  # SubjectAccessReview: usernames allowed `get` /metrics
        self.reviews: list[tuple[str, dict]] = []  # (kind, spec) of every TokenReview/SubjectAccessReview
        # "group/version" -> kinds served there (API discovery)
        self.installed: dict[str, set[str]] = {
            "v1": {"Pod", "ConfigMap"},
            "inference.networking.k8s.io/v1": {"InferencePool"},
            "inference.networking.x-k8s.io/v1alpha2": {"InferencePool", "InferenceObjective",
                                                       "InferenceModelRewrite", "InferenceModel"},
        }
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> KubeApiStandIn:
        ready = threading.Event()
        errors: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                loop.run_until_complete(self._serve())
            except BaseException as e:  # noqa: BLE001 - reported to start()
                errors.append(e)
                ready.set()
                return
            ready.set()
            loop.run_forever()
            loop.run_until_complete(self._shutdown())
            loop.close()

        self._thread = threading.Thread(target=run, name="kubeapi-stand-in", daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise TimeoutError("Kubernetes API stand-in did not start")
        if errors:
            raise errors[0]
        return self

    def stop(self) -> None:
        if self._loop and self._thread and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)

    def __enter__(self) -> KubeApiStandIn:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    async def _serve(self) -> None:
        app = web.Application()
        app.router.add_get("/api/v1/namespaces/{ns}/{plural}", self._h_list)
        app.router.add_get("/apis/{group}/{version}", self._h_discovery)
        app.router.add_get("/api/{version}", self._h_discovery)
        app.router.add_get("/apis/{group}/{version}/namespaces/{ns}/{plural}", self._h_list)
        app.router.add_get("/apis/{group}/{version}/namespaces/{ns}/{plural}/{name}", self._h_get)
        app.router.add_post("/apis/{group}/{version}/namespaces/{ns}/{plural}", self._h_create)
        app.router.add_put("/apis/{group}/{version}/namespaces/{ns}/{plural}/{name}", self._h_update)
        app.router.add_post("/apis/authentication.k8s.io/v1/tokenreviews", self._h_review)
        app.router.add_post("/apis/authorization.k8s.io/v1/subjectaccessreviews", self._h_review)
        self._runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=0.5)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def _shutdown(self) -> None:
        for w in list(self._watchers):
            w.queue.put_nowait(None)
        if self._runner:
            await self._runner.cleanup()

    def write_kubeconfig(self, path: str | Path, namespace: str = "default", token: str | None = None) -> str:
        cfg = {
            "apiVersion": "v1", "kind": "Config", "current-context": "stand-in",
            "clusters": [{"name": "stand-in", "cluster": {"server": self.url}}],
            "users": [{"name": "epp", "user": {"token": token or self.token}}],
            "contexts": [{"name": "stand-in", "context": {"cluster": "stand-in", "user": "epp",
                                                           "namespace": namespace}}],
        }
        Path(path).write_text(json.dumps(cfg))
        return str(path)

    # ------------------------------------------------------------------ objects (thread-safe)
    def apply(self, obj: dict) -> dict:
        """Create or replace an object (like `kubectl apply` of a whole object)."""
        group, plural = _resource_of(obj)
        meta = obj.setdefault("metadata", {})
        ns = meta.setdefault("namespace", "default")
        with self._lock:
            store = self._store(group, plural)
            old = store.objects.get((ns, meta["name"]))
            meta.setdefault("uid", f"uid-{meta['name']}-{self._last_rv + 1}")
            meta.setdefault("creationTimestamp", old["metadata"]["creationTimestamp"] if old else _now_rfc3339())
            if old is not None:
                meta["uid"] = old["metadata"]["uid"]
            return self._write(group, plural, "MODIFIED" if old else "ADDED", obj)

    def delete(self, kind_plural: str, name: str, namespace: str = "default", group: str = "") -> None:
        with self._lock:
            store = self._store(group, kind_plural)
            obj = store.objects.get((namespace, name))
            if obj is None:
                raise KeyError(f"{kind_plural}/{name} not found")
            self._write(group, kind_plural, "DELETED", copy.deepcopy(obj))

    def get(self, plural: str, name: str, namespace: str = "default", group: str = "") -> dict | None:
        with self._lock:
            obj = self._store(group, plural).objects.get((namespace, name))
            return copy.deepcopy(obj) if obj else None

    def _store(self, group: str, plural: str) -> _Store:
        return self._stores.setdefault((group, plural), _Store())

    def _write(self, group: str, plural: str, etype: str, obj: dict) -> dict:
        rv = next(self._rv)
        self._last_rv = rv
        obj = copy.deepcopy(obj)
        meta = obj["metadata"]
        meta["resourceVersion"] = str(rv)
        store = self._store(group, plural)
        key = (meta["namespace"], meta["name"])
        if etype == "DELETED":
            store.objects.pop(key, None)
        else:
            store.objects[key] = obj
        store.history.append(_Event(rv, etype, meta["namespace"], obj))
        self._notify((group, plural), _Event(rv, etype, meta["namespace"], obj))
        return copy.deepcopy(obj)

    def _notify(self, key: tuple[str, str], event: _Event) -> None:
        if self._loop is None:
            return
        for w in list(self._watchers):
            if w.key == key and w.namespace == event.namespace and w.name in (None, event.obj["metadata"]["name"]):
                self._loop.call_soon_threadsafe(w.queue.put_nowait, event)

    def install_llmd_crds(self, *, legacy: bool = True) -> None:
        """Serve InferenceObjective and InferenceModelRewrite in llm-d.ai/v1alpha2; with
        legacy=False, stop serving them in inference.networking.x-k8s.io/v1alpha2."""
        with self._lock:
            self.installed["llm-d.ai/v1alpha2"] = {"InferenceObjective", "InferenceModelRewrite"}
            if not legacy:
                self.installed["inference.networking.x-k8s.io/v1alpha2"] -= {"InferenceObjective",
                                                                            "InferenceModelRewrite"}

    # ------------------------------------------------------------------ pods
    def put_pod(self, name: str, ip: str = "10.0.0.1", labels: dict[str, str] | None = None,
                ready: bool = True, namespace: str = "default", annotations: dict[str, str] | None = None,
                ports: list[int] | None = None) -> dict:
        pod = {
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": namespace, "labels": dict(labels or {}),
                         "annotations": dict(annotations or {})},
            "spec": {"containers": [{"name": "server", "image": "sim",
                                     "ports": [{"containerPort": p} for p in (ports or [])]}]},
            "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}] if ip else [],
                       "conditions": [{"type": "Ready", "status": "True" if ready else "False"}]},
        }
        if not ip:
            del pod["status"]["podIP"]
        return self.apply(pod)

    def set_pod_ready(self, name: str, ready: bool, namespace: str = "default") -> dict:
        pod = self.get("pods", name, namespace)
        assert pod is not None, f"pod {name} not found"
        pod["status"]["conditions"] = [{"type": "Ready", "status": "True" if ready else "False"}]
        return self.apply(pod)

    # ------------------------------------------------------------------ faults
    def drop_watches(self) -> int:
        """Close every open watch stream abruptly (as a restarting API server would)."""
        with self._lock:
            watchers = list(self._watchers)
        for w in watchers:
            if self._loop:
                self._loop.call_soon_threadsafe(w.queue.put_nowait, "drop")
        return len(watchers)

    def compact(self) -> None:
        """Forget all history: a watch from any earlier resourceVersion gets 410 Gone."""
        with self._lock:
            for store in self._stores.values():
                store.history.clear()
                store.compacted_rv = self._last_rv

    def expire_watches(self) -> None:
        """Compact and send an in-stream ERROR 410 to every open watch (the API server's
        'too old resource version' while watching)."""
        self.compact()
        with self._lock:
            watchers = list(self._watchers)
        for w in watchers:
            if self._loop:
                self._loop.call_soon_threadsafe(w.queue.put_nowait, "gone")

    def forbid(self, verb: str, resource: str) -> None:
        with self._lock:
            self._forbidden.add((verb, resource))

    def allow(self, verb: str, resource: str) -> None:
        with self._lock:
            self._forbidden.discard((verb, resource))

    def fail_next(self, count: int, status: int = 500) -> None:
        with self._lock:
            self._fail_next.extend([status] * count)

    def open_watches(self, plural: str | None = None) -> int:
        with self._lock:
            return sum(1 for w in self._watchers if w.response is not None and plural in (None, w.key[1]))

    def requests(self, verb: str | None = None, resource: str | None = None) -> int:
        with self._lock:
            return sum(1 for v, _, r in self.audit if verb in (None, v) and resource in (None, r))

    @contextmanager
    def forbidden(self, verb: str, resource: str) -> Iterator[None]:
        self.forbid(verb, resource)
        try:
            yield
        finally:
            self.allow(verb, resource)

    # ------------------------------------------------------------------ HTTP handlers
    def _gate(self, request: web.Request, verb: str) -> web.Response | None:
        """Audit the request; refuse it when unauthenticated, forbidden or failing on purpose."""
        ns, plural = request.match_info["ns"], request.match_info["plural"]
        group = request.match_info.get("group", "")
        with self._lock:
            self.audit.append((verb, group, plural))
            if request.headers.get("Authorization") != f"Bearer {self.token}":
                return _status(401, "Unauthorized", "Unauthorized")
            if (verb, plural) in self._forbidden:
                user = "system:serviceaccount:default:epp"
                msg = (f'{plural} is forbidden: User "{user}" cannot {verb} resource "{plural}" in API group '
                       f'"{group}" in the namespace "{ns}"')
                return _status(403, "Forbidden", msg, details={"group": group, "kind": plural})
            if self._fail_next:
                code = self._fail_next.pop(0)
                return _status(code, "InternalError", "injected failure")
        return None

    async def _h_list(self, request: web.Request) -> web.StreamResponse:
        group = request.match_info.get("group", "")
        plural = request.match_info["plural"]
        ns = request.match_info["ns"]
        q = request.query
        watching = q.get("watch") in ("true", "1")
        if denied := self._gate(request, "watch" if watching else "list"):
            return denied
        if q.get("labelSelector"):
            return _status(400, "BadRequest", "the stand-in does not implement labelSelector")
        name = None
        if q.get("fieldSelector"):
            fs = q["fieldSelector"]
            if not fs.startswith("metadata.name="):
                return _status(400, "BadRequest", f"unsupported fieldSelector {fs!r}")
            name = fs.split("=", 1)[1]
        if watching:
            return await self._watch(request, group, plural, ns, name)
        with self._lock:
            items = [copy.deepcopy(o) for (ons, oname), o in sorted(self._store(group, plural).objects.items())
                     if ons == ns and name in (None, oname)]
            rv = str(self._last_rv)
        kind = items[0]["kind"] + "List" if items else "List"
        return web.json_response({"apiVersion": "v1" if not group else f"{group}/{request.match_info['version']}",
                                  "kind": kind, "metadata": {"resourceVersion": rv}, "items": items})

    async def _watch(self, request: web.Request, group: str, plural: str, ns: str,
                     name: str | None) -> web.StreamResponse:
        q = request.query
        try:
            since = int(q.get("resourceVersion") or "0")
        except ValueError:
            return _status(400, "BadRequest", "bad resourceVersion")
        timeout = float(q.get("timeoutSeconds") or 1800)
        bookmarks = q.get("allowWatchBookmarks") in ("true", "1")
        watcher = _Watcher((group, plural), ns, name, asyncio.Queue())
        with self._lock:
            store = self._store(group, plural)
            self.watch_starts.append((plural, str(since)))
            if since and since < store.compacted_rv:
                return _status(410, "Expired", f"too old resource version: {since} ({store.compacted_rv})")
            backlog = [e for e in store.history if e.rv > since and e.namespace == ns
                       and name in (None, e.obj["metadata"]["name"])] if since else []
            if not since:  # rv 0 / unset: synthetic ADDED for the current state
                backlog = [_Event(self._last_rv, "ADDED", ons, copy.deepcopy(o))
                           for (ons, oname), o in sorted(store.objects.items()) if ons == ns and name in (None, oname)]
            self._watchers.append(watcher)
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        resp.enable_chunked_encoding()
        try:
            await resp.prepare(request)
            # aiohttp holds the headers until the first body write; the API server
            # sends them at once, and clients wait for them before reading events.
            writer = getattr(resp, "_payload_writer", None)
            if writer is not None and hasattr(writer, "send_headers"):
                writer.send_headers()
            watcher.response = resp
            for e in backlog:
                await resp.write(_line(e.type, e.obj))
            deadline = time.monotonic() + timeout
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                try:
                    item = await asyncio.wait_for(watcher.queue.get(), timeout=min(left, 1.0))
                except TimeoutError:
                    if bookmarks:
                        bm = {"kind": "Bookmark", "metadata": {"resourceVersion": str(self._last_rv)}}
                        await resp.write(_line("BOOKMARK", bm))
                    continue
                if item is None:
                    break
                if item == "drop":
                    # Abort the connection mid-stream: no terminating chunk.
                    if request.transport:
                        request.transport.abort()
                    return resp
                if item == "gone":
                    status = {"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 410,
                              "reason": "Expired", "message": "too old resource version"}
                    await resp.write(_line("ERROR", status))
                    break
                await resp.write(_line(item.type, item.obj))
            await resp.write_eof()
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        finally:
            with self._lock:
                if watcher in self._watchers:
                    self._watchers.remove(watcher)
        return resp

    async def _h_discovery(self, request: web.Request) -> web.Response:
        if request.headers.get("Authorization") != f"Bearer {self.token}":
            return _status(401, "Unauthorized", "Unauthorized")
        group = request.match_info.get("group", "")
        gv = f"{group}/{request.match_info['version']}" if group else request.match_info["version"]
        with self._lock:
            kinds = sorted(self.installed.get(gv, ()))
        if not kinds:
            return _status(404, "NotFound", "the server could not find the requested resource")
        return web.json_response({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv,
                                  "resources": [{"name": _PLURALS[k], "singularName": k.lower(), "namespaced": True,
                                                 "kind": k, "verbs": ["get", "list", "watch"]} for k in kinds]})

    async def _h_get(self, request: web.Request) -> web.Response:
        if denied := self._gate(request, "get"):
            return denied
        group, plural = request.match_info["group"], request.match_info["plural"]
        obj = self.get(plural, request.match_info["name"], request.match_info["ns"], group)
        if obj is None:
            return _status(404, "NotFound", f'{plural} "{request.match_info["name"]}" not found')
        return web.json_response(obj)

    async def _h_create(self, request: web.Request) -> web.Response:
        if denied := self._gate(request, "create"):
            return denied
        group, plural = request.match_info["group"], request.match_info["plural"]
        body = await request.json()
        meta = body.setdefault("metadata", {})
        meta["namespace"] = request.match_info["ns"]
        with self._lock:
            if (meta["namespace"], meta.get("name")) in self._store(group, plural).objects:
                return _status(409, "AlreadyExists", f'{plural} "{meta.get("name")}" already exists')
            meta["uid"] = f"uid-{meta['name']}-{self._last_rv + 1}"
            meta["creationTimestamp"] = _now_rfc3339()
            obj = self._write(group, plural, "ADDED", body)
        return web.json_response(obj, status=201)

    async def _h_update(self, request: web.Request) -> web.Response:
        if denied := self._gate(request, "update"):
            return denied
        group, plural = request.match_info["group"], request.match_info["plural"]
        body = await request.json()
        ns, name = request.match_info["ns"], request.match_info["name"]
        with self._lock:
            old = self._store(group, plural).objects.get((ns, name))
            if old is None:
                return _status(404, "NotFound", f'{plural} "{name}" not found')
            if body.get("metadata", {}).get("resourceVersion") != old["metadata"]["resourceVersion"]:
                return _status(409, "Conflict", f'Operation cannot be fulfilled on {plural} "{name}": '
                               "the object has been modified; please apply your changes to the latest version")
            body["metadata"].update(namespace=ns, uid=old["metadata"]["uid"],
                                    creationTimestamp=old["metadata"]["creationTimestamp"])
            obj = self._write(group, plural, "MODIFIED", body)
        return web.json_response(obj)

    async def _h_review(self, request: web.Request) -> web.Response:
        """TokenReview (status.authenticated/user) and SubjectAccessReview (status.allowed for
        nonResourceAttributes) from review_users and metrics_readers."""
        body = await request.json()
        kind, spec = body.get("kind", ""), body.get("spec") or {}
        with self._lock:
            group = "authentication.k8s.io" if kind == "TokenReview" else "authorization.k8s.io"
            self.audit.append(("create", group, kind.lower() + "s"))
            if request.headers.get("Authorization") != f"Bearer {self.token}":
                return _status(401, "Unauthorized", "Unauthorized")
            if self._fail_next:
                return _status(self._fail_next.pop(0), "InternalError", "injected failure")
            self.reviews.append((kind, spec))
            if kind == "TokenReview":
                user = self.review_users.get(spec.get("token", ""))
                status: dict[str, Any] = {"authenticated": True, "user": user} if user else {"authenticated": False}
            else:
                attrs = spec.get("nonResourceAttributes") or {}
                status = {"allowed": spec.get("user") in self.metrics_readers and attrs.get("verb") == "get"
                          and attrs.get("path") == "/metrics"}
        return web.json_response({**body, "status": status}, status=201)


def _line(etype: str, obj: dict) -> bytes:
    return json.dumps({"type": etype, "object": obj}).encode() + b"\n"


def _status(code: int, reason: str, message: str, details: dict[str, Any] | None = None) -> web.Response:
    body = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": message,
            "reason": reason, "code": code}
    if details:
        body["details"] = details
    return web.json_response(body, status=code)


_PLURALS = {"Pod": "pods", "InferencePool": "inferencepools", "InferenceObjective": "inferenceobjectives",
            "InferenceModelRewrite": "inferencemodelrewrites", "InferenceModel": "inferencemodels",
            "Lease": "leases", "ConfigMap": "configmaps"}


def _resource_of(obj: dict) -> tuple[str, str]:
    api_version = obj["apiVersion"]
    group = api_version.rsplit("/", 1)[0] if "/" in api_version else ""
    return group, _PLURALS[obj["kind"]]


# --------------------------------------------------------------------------- object builders
def inference_pool(name: str, match_labels: dict[str, str], ports: list[int], namespace: str = "default",
                   group: str = "inference.networking.k8s.io") -> dict:
    if group == "inference.networking.x-k8s.io":  # legacy v1alpha2 shape
        return {"apiVersion": f"{group}/v1alpha2", "kind": "InferencePool",
                "metadata": {"name": name, "namespace": namespace},
                "spec": {"selector": dict(match_labels), "targetPortNumber": ports[0],
                         "extensionRef": {"name": f"{name}-epp"}}}
    return {"apiVersion": f"{group}/v1", "kind": "InferencePool",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"selector": {"matchLabels": dict(match_labels)},
                     "targetPorts": [{"number": p} for p in ports],
                     "endpointPickerRef": {"name": f"{name}-epp", "port": {"number": 9002}}}}


def model_rewrite(name: str, pool: str, rules: list[dict], namespace: str = "default",
                  group: str = "inference.networking.x-k8s.io") -> dict:
    return {"apiVersion": f"{group}/v1alpha2", "kind": "InferenceModelRewrite",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"poolRef": {"group": "inference.networking.k8s.io", "kind": "InferencePool", "name": pool},
                     "rules": rules}}


def objective(name: str, pool: str, priority: int | None = None, namespace: str = "default",
              group: str = "inference.networking.x-k8s.io") -> dict:
    spec: dict[str, Any] = {"poolRef": {"group": "inference.networking.k8s.io", "kind": "InferencePool",
                                        "name": pool}}
    if priority is not None:
        spec["priority"] = priority
    return {"apiVersion": f"{group}/v1alpha2", "kind": "InferenceObjective",
            "metadata": {"name": name, "namespace": namespace}, "spec": spec}
