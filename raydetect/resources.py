"""Fail fast when the Ray cluster cannot run the detector actors a job asks for.

Ray queues an actor whose resources no node has until one appears, so a job asking for GPUs on a
CPU-only cluster would wait forever. :func:`wait_for_actor_resources` checks the alive nodes
first: when enough of them fit ``min_actors`` actors it returns at once; otherwise it waits (an
autoscaler may be adding nodes) at most ``wait_s`` seconds, then raises
:class:`InsufficientResourcesError` naming what was asked and what the cluster has. A Ray
instance this process started itself cannot grow, so there it does not wait at all.
"""

from __future__ import annotations

import logging
import math
import time
from typing import TYPE_CHECKING

from raydetect.errors import RaydetectError

if TYPE_CHECKING:
    from raydetect.config import JobConfig

log = logging.getLogger(__name__)


class InsufficientResourcesError(RaydetectError, RuntimeError):
    """The cluster has no room for the actors a job needs (the CLI exits 2 with the message)."""


def _fits(node: dict[str, float], num_cpus: float, num_gpus: float) -> int:
    """How many actors of (num_cpus, num_gpus) the node's total resources hold."""
    n = math.inf
    for key, need in (("CPU", num_cpus), ("GPU", num_gpus)):
        if need > 0:
            n = min(n, math.floor(node.get(key, 0.0) / need + 1e-9))
    return 0 if n == math.inf else int(n)


def cluster_nodes() -> list[dict[str, float]]:
    import ray

    return [n["Resources"] for n in ray.nodes() if n.get("Alive")]


def started_here() -> bool:
    """Whether this process started the Ray instance it is connected to (then no autoscaler can
    add nodes to it)."""
    try:
        import ray._private.worker as w

        return bool(getattr(w._global_node, "head", False))
    except Exception:  # private API moved: assume the cluster may grow
        return False


def _describe(nodes: list[dict[str, float]]) -> str:
    cpus = sum(n.get("CPU", 0.0) for n in nodes)
    gpus = sum(n.get("GPU", 0.0) for n in nodes)
    return f"{len(nodes)} node(s) with {cpus:g} CPUs and {gpus:g} GPUs in all"


def wait_for_actor_resources(
    num_cpus: float,
    num_gpus: float,
    min_actors: int,
    wait_s: float,
    *,
    what: str = "detector actor",
    may_grow: bool | None = None,
    poll_s: float = 2.0,
) -> None:
    """Return once the alive nodes hold ``min_actors`` actors of ``num_cpus``/``num_gpus`` each;
    raise :class:`InsufficientResourcesError` after ``wait_s`` seconds (at once when the cluster
    cannot grow: ``may_grow`` False, default: False for a Ray instance this process started)."""
    if may_grow is None:
        may_grow = not started_here()
    budget = wait_s if may_grow else 0.0
    t0 = time.monotonic()
    logged = False
    while True:
        nodes = cluster_nodes()
        room = sum(_fits(n, num_cpus, num_gpus) for n in nodes)
        if room >= min_actors:
            return
        waited = time.monotonic() - t0
        if waited >= budget:
            break
        if not logged:
            log.warning("waiting up to %.0f s for the cluster to fit %d %s(s) of %g CPU, %g GPU (now room for %d)",
                        budget, min_actors, what, num_cpus, num_gpus, room)
            logged = True
        time.sleep(min(poll_s, max(budget - waited, 0.05)))
    asked = f"{min_actors} {what}(s) of {num_cpus:g} CPU and {num_gpus:g} GPU each"
    why = (f"waited {budget:.0f} s for an autoscaler to add nodes (--resource-wait-s)" if may_grow
           else "this Ray instance was started by this command and cannot add nodes")
    hint = (" Use --num-gpus 0 to run on CPUs, or a cluster with GPU nodes."
            if num_gpus > 0 and not any(n.get("GPU", 0.0) for n in nodes) else "")
    raise InsufficientResourcesError(
        f"the job asks for {asked}, but the cluster has room for {room}: {_describe(nodes)} "
        f"({why}).{hint}"
    )


def initial_actors(cfg: JobConfig, files: int, free_cpus: float, rows_per_call: int | None = None,
                   spare_cpus: float = 0.0) -> int:
    """Detector actors to start at once: as many as the input can keep busy, up to
    ``cfg.concurrency``, not ``min_actors``, from which the pool adds them one at a time as its
    queue grows (2 actors on 2 CPUs, 240 images: the second started 3-8 s after the first).
    Only as many as the ``free_cpus`` hold while ``spare_cpus`` stay free for the tasks that
    feed them: actors started ahead of the pool's own resource budget could otherwise take
    every CPU and starve those tasks (a job whose reads ran in tasks hung so). An image job's
    actors read their own files (no tasks: 0); a video job's segments are planned in tasks (1).
    ``rows_per_call`` defaults to the image job's (``cfg.rows_per_call`` or the detector
    batch); a video job passes its sessions per actor, with ``files`` the videos (a lower bound
    of its segments)."""
    rows = rows_per_call or cfg.rows_per_call or cfg.detector.batch_size
    fit = int((free_cpus - spare_cpus) // cfg.num_cpus) if cfg.num_cpus > 0 else cfg.concurrency
    return max(min(cfg.min_actors, cfg.concurrency), min(cfg.concurrency, -(-files // rows), fit))
