"""Kubernetes object events for k8s-notification-source: one kind (group, version, kind)
watched in the pool's namespace, each add/update and delete handed to the source's
extractors as `extract_notification(event, obj)` with event "upsert" or "delete" and the
object as the API's JSON (the reference delivers it as Unstructured).

The kind's resource name comes from API discovery at start-up; a kind the server does
not serve, or a failed discovery, is a start-up error naming the source. A re-list (after
a 410 or a restart) delivers upsert for every object and delete for the ones gone, as an
informer does. Watching needs list and watch on the resource, which the operator grants
(the picker's Role covers only what discovery needs).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

from epp.datalayer.kinds import DELETE, UPSERT
from epp.discovery.kubeclient import Backoff, Reflector, Resource, served_resources

log = logging.getLogger("epp.discovery.kubernetes")


class NotificationWatch:
    """One k8s-notification-source with its extractors, over a Reflector."""

    def __init__(self, name: str, group: str, version: str, kind: str, extractors: Sequence[Any]) -> None:
        self.name = name
        self.group, self.version, self.kind = group, version, kind
        self.extractors = list(extractors)
        self._reflector: Reflector | None = None
        self._known: set[tuple[str, str]] = set()  # (namespace, name) of the objects delivered; bounded by the API

    def resolve(self, api: Any) -> Resource:
        """The kind's resource, by API discovery (blocking); ValueError naming the source."""
        gv = f"{self.group}/{self.version}" if self.group else self.version
        resources = served_resources(api, self.group, self.version)
        if resources is None:
            raise ValueError(f"k8s-notification-source {self.name!r}: API discovery of {gv} failed")
        plural = resources.get(self.kind)
        if plural is None:
            raise ValueError(f"k8s-notification-source {self.name!r}: the API server does not serve {self.kind} "
                             f"in {gv}")
        return Resource(self.group, self.version, plural)

    async def start(self, api: Any, namespace: str, *, backoff: Backoff | None = None) -> None:
        resource = await asyncio.to_thread(self.resolve, api)
        self._reflector = Reflector(api, resource, namespace, asyncio.get_running_loop(), self._on_list,
                                    self._on_event, backoff=backoff)
        self._reflector.start()
        log.info("k8s-notification-source %s: watching %s in %s", self.name, resource, namespace)

    async def stop(self) -> None:
        if self._reflector is not None:
            self._reflector.stop()
            await asyncio.to_thread(self._reflector.join)
            self._reflector = None

    def _on_list(self, items: list[dict]) -> None:
        current = {_key(obj): obj for obj in items}
        for key in sorted(self._known - set(current)):
            self._notify(DELETE, {"apiVersion": self._api_version(), "kind": self.kind,
                                  "metadata": {"namespace": key[0], "name": key[1]}})
        self._known = set(current)
        for obj in current.values():
            self._notify(UPSERT, obj)

    def _on_event(self, etype: str, obj: dict) -> None:
        key = _key(obj)
        if etype == "DELETED":
            self._known.discard(key)
            self._notify(DELETE, obj)
        else:
            self._known.add(key)
            self._notify(UPSERT, obj)

    def _api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    def _notify(self, event: str, obj: dict) -> None:
        for ex in self.extractors:
            try:
                ex.extract_notification(event, obj)
            except Exception:  # noqa: BLE001 - one extractor's failure must not stop the watch
                log.exception("k8s-notification extractor %s failed on %s %s/%s", ex.name, event, self.kind,
                              _key(obj)[1])


def _key(obj: dict) -> tuple[str, str]:
    meta = obj.get("metadata") or {}
    return str(meta.get("namespace", "")), str(meta.get("name", ""))
