"""The `kubernetes` client, used from threads: configuration and a list-then-watch loop.

The client is synchronous; each `Reflector` owns one thread that lists a resource,
watches from the list's resourceVersion, re-lists on 410 Gone and backs off on
errors. Results go back to the asyncio loop with `call_soon_threadsafe`, so the loop
never blocks and every datastore write happens on the loop.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import KW_ONLY, dataclass

import orjson
import urllib3
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException
from kubernetes.config.config_exception import ConfigException

from epp.backoff import Backoff

log = logging.getLogger("epp.discovery.kubernetes")

WATCH_TIMEOUT_SECONDS = 300  # server-side watch length; the client re-watches after it
CONNECT_TIMEOUT = 5.0
LIST_READ_TIMEOUT = 30.0


@dataclass(frozen=True, slots=True)
class Resource:
    """A namespaced resource the picker reads."""

    group: str  # "" = core
    version: str
    plural: str

    def __str__(self) -> str:
        return f"{self.plural}.{self.group}" if self.group else self.plural


def load_api_client(kubeconfig: str = "") -> client.ApiClient:
    """--kubeconfig if given, else in-cluster, else ~/.kube/config (blocking: file reads).
    Raises ValueError saying which sources were tried."""
    cfg = client.Configuration()
    try:
        if kubeconfig:
            config.load_kube_config(config_file=kubeconfig, client_configuration=cfg)
        else:
            try:
                config.load_incluster_config(client_configuration=cfg)
            except ConfigException:
                config.load_kube_config(client_configuration=cfg)
    except (ConfigException, OSError, TypeError, ValueError) as e:
        tried = f"--kubeconfig={kubeconfig}" if kubeconfig else "in-cluster service account, then ~/.kube/config"
        raise ValueError(f"Kubernetes client configuration failed ({tried}): {e}") from None
    return client.ApiClient(cfg)


def api_request(api: client.ApiClient, method: str, path: str, query: dict[str, object] | None = None,
                body: dict | None = None, timeout: tuple[float, float] = (CONNECT_TIMEOUT, LIST_READ_TIMEOUT),
                ) -> urllib3.HTTPResponse:
    """One call through the client's own serialisation, auth (token refresh included)
    and REST layer, returning the raw response (non-2xx raises ApiException), as the
    generated `*_Api` methods do with `_preload_content=False`. Calling the generic layer
    avoids importing `CoreV1Api`, whose module takes seconds of CPU to import."""
    accept = "application/json;stream=watch" if (query or {}).get("watch") else "application/json"
    headers = {"Accept": accept}
    if body is not None:
        headers["Content-Type"] = "application/json"
    params = [(k, v) for k, v in (query or {}).items() if v is not None]
    method, url, headers, body, post = api.param_serialize(method=method, resource_path=path, query_params=params,
                                                           header_params=headers, body=body,
                                                           auth_settings=["BearerToken"])
    resp = api.call_api(method, url, headers, body, post, _request_timeout=timeout)
    if not 200 <= resp.status <= 299:
        resp.read()
        raise ApiException.from_response(http_resp=resp, body=None, data=None)
    return resp.response


def resource_path(resource: Resource, namespace: str, name: str = "") -> str:
    base = f"/api/{resource.version}" if not resource.group else f"/apis/{resource.group}/{resource.version}"
    return f"{base}/namespaces/{namespace}/{resource.plural}" + (f"/{name}" if name else "")


def served_kinds(api: client.ApiClient, group: str, version: str) -> frozenset[str] | None:
    """The kinds the API server serves in group/version (API discovery,
    GET /apis/<group>/<version>): empty when the group version is not served (404),
    None when the server could not say (another error)."""
    resources = served_resources(api, group, version)
    return None if resources is None else frozenset(resources)


def served_resources(api: client.ApiClient, group: str, version: str) -> dict[str, str] | None:
    """kind -> plural of the namespaced resources served in group/version ("" = the core
    group, /api/v1); {} when the group version is not served, None when unknown."""
    path = f"/apis/{group}/{version}" if group else f"/api/{version}"
    try:
        resp = api_request(api, "GET", path)
    except ApiException as e:
        if e.status == 404:
            return {}
        log.warning("API discovery of %s failed: HTTP %s %s", path, e.status, _api_message(e))
        return None
    except Exception as e:  # noqa: BLE001 - network errors: the caller falls back
        log.warning("API discovery of %s failed: %s: %s", path, type(e).__name__, e)
        return None
    try:
        body = orjson.loads(resp.data)
    except orjson.JSONDecodeError:
        return None
    finally:
        resp.release_conn()
    return {r["kind"]: r["name"] for r in body.get("resources") or []
            if isinstance(r, dict) and isinstance(r.get("kind"), str) and isinstance(r.get("name"), str)
            and "/" not in r["name"]}  # subresources (pods/status) are not watchable kinds


def describe_api_error(e: ApiException, verb: str, resource: Resource, namespace: str) -> str:
    """A log line an operator can act on; for 401/403 it names the missing permission."""
    if e.status == 403:
        return (f"forbidden: the picker's service account may not {verb} {resource} in namespace {namespace}; "
                f"grant it in the Role: apiGroups [{resource.group!r}], resources [{resource.plural}], "
                f"verbs [{verb}] ({_api_message(e)})")
    if e.status == 401:
        return (f"unauthorized: the API server rejected the picker's credentials to {verb} {resource} "
                f"({_api_message(e)})")
    if e.status == 404:
        return (f"{verb} {resource}: the API server does not serve {resource.group}/{resource.version} "
                f"{resource.plural}; is the CRD installed?")
    return f"{verb} {resource} in namespace {namespace} failed: HTTP {e.status} {_api_message(e)}"


def _api_message(e: ApiException) -> str:
    try:
        return orjson.loads(e.body).get("message") or e.reason or ""
    except (orjson.JSONDecodeError, TypeError, AttributeError):
        return str(e.reason or "")


class _Gone(Exception):
    """410: the resourceVersion we watch from was compacted away; re-list."""


@dataclass(eq=False)
class Reflector:
    """List then watch one resource in one namespace, on a thread of its own; `on_list` and
    `on_event` are called on `loop`."""

    api: client.ApiClient
    resource: Resource
    namespace: str
    loop: asyncio.AbstractEventLoop
    on_list: Callable[[list[dict]], None]
    on_event: Callable[[str, dict], None]
    _: KW_ONLY
    field_selector: str | None = None
    backoff: Backoff | None = None  # None: a default Backoff

    def __post_init__(self) -> None:
        self.backoff = self.backoff or Backoff()
        self._stop = threading.Event()
        self._response: urllib3.HTTPResponse | None = None
        self._last_rv = ""
        self._thread = threading.Thread(target=self._run, name=f"watch-{self.resource.plural}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Ask the thread to end and interrupt a blocked read; join with `join()`."""
        self._stop.set()
        resp = self._response
        if resp is not None:
            try:
                resp.shutdown()  # unblocks a read in progress on the worker thread
            except Exception:  # noqa: BLE001 - already closed or released
                pass

    def join(self, timeout: float = 5.0) -> None:
        if self._thread.is_alive():
            self._thread.join(timeout)

    # ------------------------------------------------------------------ thread side
    def _deliver(self, fn: Callable, *args: object) -> None:
        if self._stop.is_set():
            return
        try:
            self.loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # loop closed
            self._stop.set()

    def _run(self) -> None:
        rv: str | None = None  # None = (re-)list first
        while not self._stop.is_set():
            verb = "list" if rv is None else "watch"
            try:
                if rv is None:
                    rv = self._list()
                    verb = "watch"
                self._last_rv = rv
                self._watch(rv)
                rv = self._last_rv  # stream ended (server timeout): watch on from there
                continue
            except _Gone:
                log.info("watch %s: resourceVersion expired (410 Gone); re-listing", self.resource)
                rv = None
                continue
            except ApiException as e:
                if self._stop.is_set():
                    return
                delay = self.backoff.next()
                level = logging.ERROR if e.status in (401, 403, 404) else logging.WARNING
                log.log(level, "%s; retrying in %.1fs", describe_api_error(e, verb, self.resource, self.namespace),
                        delay)
            except Exception as e:  # noqa: BLE001 - network errors, stream drops, bad JSON
                if self._stop.is_set():
                    return
                delay = self.backoff.next()
                log.warning("%s %s: %s: %s; reconnecting in %.1fs", verb, self.resource, type(e).__name__, e, delay)
            if verb == "watch":
                rv = self._last_rv  # resume the watch where the dropped stream left off
            self._stop.wait(delay)

    def _call(self, timeout: tuple[float, float], **query: object) -> urllib3.HTTPResponse:
        query["fieldSelector"] = self.field_selector
        return api_request(self.api, "GET", resource_path(self.resource, self.namespace), query, timeout=timeout)

    def _list(self) -> str:
        resp = self._call((CONNECT_TIMEOUT, LIST_READ_TIMEOUT))
        try:
            body = orjson.loads(resp.data)
        finally:
            resp.release_conn()
        items = body.get("items") or []
        self._deliver(self.on_list, items)
        return (body.get("metadata") or {}).get("resourceVersion", "")

    def _watch(self, rv: str) -> None:
        """Watch from `rv` until the stream ends, keeping `_last_rv` current."""
        try:
            resp = self._call((CONNECT_TIMEOUT, WATCH_TIMEOUT_SECONDS + 30), watch="true", resourceVersion=rv,
                              allowWatchBookmarks="true", timeoutSeconds=WATCH_TIMEOUT_SECONDS)
        except ApiException as e:
            if e.status == 410:
                raise _Gone() from e
            raise
        self._response = resp
        self.backoff.reset()
        try:
            if self._stop.is_set():  # stop() ran before the response was visible to it
                return
            buf = b""
            for chunk in resp.stream(None, decode_content=False):
                if self._stop.is_set():
                    break
                buf += chunk
                *lines, buf = buf.split(b"\n")
                for line in lines:
                    if line.strip():
                        self._handle_line(line)
        finally:
            self._response = None
            resp.release_conn()

    def _handle_line(self, line: bytes) -> None:
        event = orjson.loads(line)
        etype, obj = event.get("type"), event.get("object") or {}
        if etype == "ERROR":
            if obj.get("code") == 410:
                raise _Gone()
            raise ApiException(status=obj.get("code") or 500, reason=obj.get("message") or "watch error")
        if etype in ("ADDED", "MODIFIED", "DELETED"):
            self._deliver(self.on_event, etype, obj)
        self._last_rv = (obj.get("metadata") or {}).get("resourceVersion") or self._last_rv



# ---------------------------------------------------------------------- /metrics authentication
# --metrics-endpoint-auth, as controller-runtime's filters.WithAuthenticationAndAuthorization:
# the bearer token is checked with a TokenReview, the user with a SubjectAccessReview for
# verb <method> on the nonResourceURL path; results cached as its delegating authenticator
# (1 min) and authorizer (allowed 5 min, denied 30 s) cache them.
TOKEN_REVIEW_PATH = "/apis/authentication.k8s.io/v1/tokenreviews"
ACCESS_REVIEW_PATH = "/apis/authorization.k8s.io/v1/subjectaccessreviews"
REVIEW_TIMEOUT = (CONNECT_TIMEOUT, 10.0)
AUTHN_CACHE_TTL = 60.0
AUTHZ_ALLOW_TTL = 300.0
AUTHZ_DENY_TTL = 30.0
MAX_CACHED_REVIEWS = 1024  # per cache; the oldest entry goes first


def token_review(api: client.ApiClient, token: str) -> dict | None:
    """The user ({username, uid, groups, extra}) the API server says `token` belongs to,
    or None when it is not authenticated. API errors raise (the caller answers 500)."""
    body = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "spec": {"token": token}}
    resp = api_request(api, "POST", TOKEN_REVIEW_PATH, body=body, timeout=REVIEW_TIMEOUT)
    try:
        status = orjson.loads(resp.data).get("status") or {}
    finally:
        resp.release_conn()
    return (status.get("user") or {}) if status.get("authenticated") else None


def access_review(api: client.ApiClient, user: dict, verb: str, path: str) -> bool:
    """Whether `user` may `verb` the non-resource URL `path` (SubjectAccessReview)."""
    spec = {"user": user.get("username", ""), "uid": user.get("uid", ""), "groups": user.get("groups") or [],
            "extra": user.get("extra") or {}, "nonResourceAttributes": {"path": path, "verb": verb}}
    body = {"apiVersion": "authorization.k8s.io/v1", "kind": "SubjectAccessReview", "spec": spec}
    resp = api_request(api, "POST", ACCESS_REVIEW_PATH, body=body, timeout=REVIEW_TIMEOUT)
    try:
        status = orjson.loads(resp.data).get("status") or {}
    finally:
        resp.release_conn()
    return bool(status.get("allowed")) and not status.get("denied")


class _TTLCache:
    def __init__(self, bound: int = MAX_CACHED_REVIEWS) -> None:
        self.bound = bound
        self._items: dict[object, tuple[float, object]] = {}
        self._lock = threading.Lock()

    def get(self, key: object, now: float) -> tuple[bool, object]:
        with self._lock:
            hit = self._items.get(key)
            if hit is None or hit[0] <= now:
                return False, None
            return True, hit[1]

    def put(self, key: object, value: object, expires: float) -> None:
        with self._lock:
            self._items.pop(key, None)
            if len(self._items) >= self.bound:
                self._items.pop(next(iter(self._items)))
            self._items[key] = (expires, value)


class MetricsAuthorizer:
    """Decides a /metrics request from its Authorization header: 200, 401 or 403 (500 when
    the API server cannot be asked). Blocking: call it from a thread."""

    def __init__(self, api: client.ApiClient, clock: Callable[[], float] | None = None) -> None:
        self.api = api
        self.clock = clock or time.monotonic
        self._authn = _TTLCache()
        self._authz = _TTLCache()

    def decide(self, authorization: str, verb: str, path: str) -> tuple[int, str]:
        parts = authorization.strip().split(" ", 2)
        if len(parts) < 2 or parts[0].lower() != "bearer" or not parts[1]:
            return 401, "Unauthorized"
        token = parts[1]
        now = self.clock()
        key = hashlib.sha256(token.encode()).digest()
        hit, user = self._authn.get(key, now)
        try:
            if not hit:
                user = token_review(self.api, token)
                self._authn.put(key, user, now + AUTHN_CACHE_TTL)
            if user is None:
                return 401, "Unauthorized"
            name = str(user.get("username", ""))  # type: ignore[union-attr]
            akey = (name, tuple(user.get("groups") or ()), verb, path)  # type: ignore[union-attr]
            hit, allowed = self._authz.get(akey, now)
            if not hit:
                allowed = access_review(self.api, user, verb, path)  # type: ignore[arg-type]
                self._authz.put(akey, allowed, now + (AUTHZ_ALLOW_TTL if allowed else AUTHZ_DENY_TTL))
        except Exception as e:  # noqa: BLE001 - API errors, network: the scrape fails, serving goes on
            log.warning("/metrics authentication: the API server could not be asked: %s", e)
            return 500, "Authentication failed"
        if not allowed:
            return 403, f"Authorization denied for user {name}"
        return 200, ""
