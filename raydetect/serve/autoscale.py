"""Serve autoscaling that sees both loads of a shared replica: online requests and archive
batches sent by ``raydetect detect --via-serve``.

Each replica reports ``online_load`` (online images waiting or in the engine) and
``archive_load`` (archive images held, in units of images) through ``record_autoscaling_stats``
(Serve's custom autoscaling metrics, Ray 2.60). :class:`SharedPoolPolicy` wants

    max(ceil(online / target), min(ceil((online + archive) / target), archive_max_replicas))

replicas: online load alone scales up to ``max_replicas``; archive load may add replicas only
up to ``archive_max_replicas``. Serve then applies ``min_replicas``/``max_replicas``, the
up/downscale delays and smoothing as for its default policy.

This module is pickled by value into the Serve controller: keep it free of heavy imports.
"""

from __future__ import annotations

import math
from typing import Any

ONLINE = "online_load"
ARCHIVE = "archive_load"


def desired_replicas(online: float, archive: float, target: float, archive_max_replicas: int) -> int:
    """Replicas for ``online`` and ``archive`` images in flight at ``target`` per replica."""
    online_need = math.ceil(online / target) if online > 0 else 0
    total_need = math.ceil((online + archive) / target) if online + archive > 0 else 0
    return max(online_need, min(total_need, archive_max_replicas))


class SharedPoolPolicy:
    """A class-callable Serve autoscaling policy (``policy_kwargs`` reach ``__init__``)."""

    def __init__(self, target: float, archive_max_replicas: int) -> None:
        self.target = float(target)
        self.archive_max_replicas = int(archive_max_replicas)

    def __call__(self, ctx) -> tuple[float, dict[str, Any]]:
        metrics = ctx.aggregated_metrics or {}
        online = sum(metrics.get(ONLINE, {}).values())
        archive = sum(metrics.get(ARCHIVE, {}).values())
        if not metrics.get(ONLINE) and not metrics.get(ARCHIVE):  # no report yet: Serve's own count
            online = float(ctx.total_num_requests or 0.0)
        want = desired_replicas(online, archive, self.target, self.archive_max_replicas)
        state = dict(ctx.policy_state or {})
        state.update({"online_load": online, "archive_load": archive, "wanted": want})
        return want, state
