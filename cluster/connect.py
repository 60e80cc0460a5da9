"""Connecting a driver to Ray: a given address, `RAY_ADDRESS`, or an embedded local cluster.

Token authentication is always on (`RAY_AUTH_MODE=token`): the embedded cluster generates a token
at ~/.ray/auth_token on first use, remote clusters are reached with the token from the standard
Ray locations (`RAY_AUTH_TOKEN`, `RAY_AUTH_TOKEN_PATH`, ~/.ray/auth_token).
"""
from __future__ import annotations

import logging
import os

LOOPBACK = "127.0.0.1"


def ensure_token_auth() -> None:
    """Turn token auth on unless the user chose a mode; `disabled` is refused on our paths."""
    mode = os.environ.setdefault("RAY_AUTH_MODE", "token")
    if mode != "token":
        raise RuntimeError(
            f"RAY_AUTH_MODE={mode!r}: lmjobs only talks to Ray with token authentication; "
            "unset RAY_AUTH_MODE or set it to 'token'")


def resolve_address(address: str | None) -> str | None:
    """The cluster to join: the explicit address, else RAY_ADDRESS, else None (embedded)."""
    address = address or os.environ.get("RAY_ADDRESS") or None
    return None if address in (None, "", "local") else address


def connect(address: str | None = None, *, num_cpus: int | None = None,
            runtime_env: dict | None = None, dashboard: bool = True) -> dict:
    """Start or join Ray for this driver; returns a small description of what it joined.

    Embedded clusters bind to 127.0.0.1, dashboard included (Ray Train's controller watchdog
    needs its state API).
    """
    import ray

    ensure_token_auth()
    target = resolve_address(address)
    if ray.is_initialized():
        return {"address": ray.get_runtime_context().gcs_address, "embedded": False}
    common = dict(logging_level=logging.WARNING, log_to_driver=True, runtime_env=runtime_env)
    if target:
        ray.init(address=target, **common)
        return {"address": target, "embedded": False}
    ray.init(num_cpus=num_cpus, include_dashboard=dashboard, dashboard_host=LOOPBACK,
             _node_ip_address=LOOPBACK, **common)
    return {"address": ray.get_runtime_context().gcs_address, "embedded": True}


def disconnect() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()
