"""The reference's file-discovery plugin: endpoints from a YAML or JSON file in the
no-Kubernetes mode, selected by `dataLayer.discovery.pluginRef`. It is --endpoints-file
under another name: the same loader, format checks and watcher (epp.discovery.static),
watching only with `watchFile: true`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from epp.discovery.static import StaticDiscovery


@dataclass(slots=True)
class FileDiscoveryParams:
    path: str = ""  # required
    watchFile: bool = False  # noqa: N815 - the reference's parameter name

    def validate(self) -> None:
        if not self.path:
            raise ValueError("path: file-discovery: 'path' parameter is required")


class FileDiscovery:
    """The reference's file-discovery plugin (`dataLayer.discovery.pluginRef`): endpoints
    from a file, watched only with `watchFile: true`. The same as --endpoints-file."""

    type_name = "file-discovery"
    Params = FileDiscoveryParams

    def __init__(self, name: str, params: FileDiscoveryParams | None, handle: object = None) -> None:
        self.name = name
        self.params = params if params is not None else FileDiscoveryParams()
        if not self.params.path:
            raise ValueError(f"{name}: file-discovery: 'path' parameter is required")

    def discovery(self, datastore: Any) -> StaticDiscovery:
        """The endpoint source (over an epp.datalayer.datastore.Datastore) to start in place
        of --endpoints / --endpoints-file."""
        return StaticDiscovery(datastore, file=self.params.path, watch=self.params.watchFile)
