"""The routing sidecar's data-parallel step (reference pkg/sidecar/proxy/data_parallel.go).

A data-parallel pod runs one API server per rank on consecutive ports; the picker's
data-parallel-profile-handler sends every request to the pod's primary port with the chosen
rank's host:port in `x-data-parallel-host-port`, and the sidecar on the primary port hands
it to that rank (a host:port that is no rank of the pod is a 400, as there). Here the ranks
are simulator servers in one process: `wire(servers, size)` makes each group of `size`
consecutive servers one pod, its first server the primary."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from epp.netaddr import join_hostport

if TYPE_CHECKING:
    from .server import SimServer

DATA_PARALLEL_HEADER = "x-data-parallel-host-port"


def hostport(server: SimServer) -> str:
    cfg = server.config
    return join_hostport(cfg.advertise_host or cfg.host, cfg.port)


def wire(servers: Sequence[SimServer], size: int) -> None:
    """Group `servers` into data-parallel pods of `size` ranks (len(servers) is a multiple)."""
    if size <= 1:
        return
    for first in range(0, len(servers), size):
        pod = servers[first:first + size]
        pod[0].ranks = {hostport(s): s for s in pod}


def rank_handler(primary: SimServer, headers: Any, handler: Any) -> Any:
    """The handler that serves a request reaching the primary port: its own, or the same
    route of the rank `x-data-parallel-host-port` names. Raises LookupError for a
    host:port that is no rank of this pod."""
    target = headers.get(DATA_PARALLEL_HEADER)
    if not target:
        return handler
    rank = primary.ranks.get(target)
    if rank is None:
        raise LookupError(f"{DATA_PARALLEL_HEADER} {target!r} names no data-parallel rank of this pod")
    routed = primary.metrics.dp_routed
    routed[target] = routed.get(target, 0) + 1
    return getattr(rank, handler.__name__)
