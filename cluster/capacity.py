"""Room on the cluster before a job's workers or actors start.

A job reserves what it needs as one placement group: on an autoscaling cluster the pending
reservation is the demand that makes the autoscaler start nodes (the shipped cloud clusters start
with a 0-CPU head and no worker).  The wait is bounded by a timeout the job's spec sets; when it
expires the error names the spec field, what was asked for and what is missing.  The embedded
cluster cannot grow: a reservation larger than it fails at once.
"""
from __future__ import annotations

import time

RESOURCES_SHOWN = ("CPU", "GPU")


class NoCapacity(RuntimeError):
    """The cluster cannot hold what a job needs (now, or within its timeout)."""


def _total(bundles: list[dict]) -> dict:
    keys = sorted({k for b in bundles for k in b})
    return {k: round(sum(b.get(k, 0.0) for b in bundles), 3) for k in keys}


def missing(need: dict, has: dict) -> dict:
    """need - has, for the resources short."""
    return {k: round(v - has.get(k, 0.0), 3) for k, v in need.items() if v > has.get(k, 0.0) + 1e-9}


def refusal(what: str, bundles: list[dict], strategy: str, why: str, has: dict, hint: str = "") -> str:
    need = _total(bundles)
    shown = {k: round(has.get(k, 0.0), 3) for k in dict.fromkeys([*RESOURCES_SHOWN, *need]) if k in has or k in need}
    short = missing(need, has)
    return (f"{what} need {need} ({len(bundles)} bundle(s), {strategy}) but {why} {shown}"
            + (f", missing {short}" if short else "") + (f"; {hint}" if hint else ""))


def reserve(bundles: list[dict], *, timeout_s: float, field: str, what: str, strategy: str = "PACK",
            fixed: bool = False, hint: str = "", log=print):
    """A ready placement group holding `bundles` (resource dicts, zero values left out).

    fixed: the cluster cannot grow (the embedded one), so a reservation larger than its total fails
    at once.  Otherwise wait up to timeout_s (an autoscaler may be booting nodes), saying so after a
    few seconds; on expiry the group is removed and NoCapacity names `field`."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    shapes = [{k: v for k, v in b.items() if v} for b in bundles]
    if not shapes or not all(shapes):
        raise ValueError(f"{what}: every bundle needs some resource, got {bundles}")
    if fixed:
        has = ray.cluster_resources()
        if missing(_total(shapes), has):
            raise NoCapacity(refusal(what, shapes, strategy, "this cluster has only", has, hint))
    group = placement_group(shapes, strategy=strategy)
    started = time.monotonic()
    try:
        ready = group.ready()
        try:
            ray.get(ready, timeout=min(3.0, timeout_s))
        except ray.exceptions.GetTimeoutError:
            log(f"[cluster] waiting up to {timeout_s:g} s ({field}) for room for {what}: "
                f"{_total(shapes)}; an autoscaler adds nodes for it, free now "
                f"{ {k: round(v, 3) for k, v in ray.available_resources().items() if k in RESOURCES_SHOWN} }")
            ray.get(ready, timeout=max(0.0, timeout_s - (time.monotonic() - started)))
            log(f"[cluster] room for {what} after {time.monotonic() - started:.0f} s")
    except ray.exceptions.GetTimeoutError:
        remove_placement_group(group)
        raise NoCapacity(refusal(what, shapes, strategy, f"the cluster could not hold them within {field}="
                                 f"{timeout_s:g} s; it has free", ray.available_resources(), hint)) from None
    return group


def wait_for(bundles: list[dict], **kwargs) -> float:
    """Wait until the cluster can hold `bundles` at once (reserved, then let go for the job's own
    scheduler: Ray Train's worker group, Tune's trials, Ray Data's actor pool); returns the seconds
    waited.  The same arguments as `reserve`."""
    from ray.util.placement_group import remove_placement_group

    started = time.monotonic()
    remove_placement_group(reserve(bundles, **kwargs))
    return time.monotonic() - started
