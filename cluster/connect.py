"""Connecting a driver to Ray: a given address, `RAY_ADDRESS`, or an embedded local cluster.

Token authentication is always on (`RAY_AUTH_MODE=token`): the embedded cluster generates a token
at ~/.ray/auth_token on first use, remote clusters are reached with the token from the standard
Ray locations (`RAY_AUTH_TOKEN`, `RAY_AUTH_TOKEN_PATH`, ~/.ray/auth_token).
"""
from __future__ import annotations

import contextlib
import logging
import os

LOOPBACK = "127.0.0.1"
LOOPBACK_NAMES = ("localhost", "::1")

# The address this process joined through `connect` as it was asked for: a ray:// (Ray Client)
# address is not the GCS address Ray reports afterwards, so it is compared as given.
_joined: str | None = None
_embedded: str | None = None  # the address of the cluster this process started, if it did


def ensure_token_auth() -> None:
    """Turn token auth on unless the user chose a mode; `disabled` is refused on our paths."""
    mode = os.environ.setdefault("RAY_AUTH_MODE", "token")
    if mode != "token":
        raise RuntimeError(
            f"RAY_AUTH_MODE={mode!r}: lmjobs only talks to Ray with token authentication; "
            "unset RAY_AUTH_MODE or set it to 'token'")


def ensure_local_token() -> str:
    """Where this machine's cluster token is, generated if there is none: `ray start --head` (unlike
    `ray.init`) refuses to start in token mode without one, which is the state of a fresh machine.
    RAY_AUTH_TOKEN (the value itself) and RAY_AUTH_TOKEN_PATH are the user's choice and are used as
    they are; otherwise ~/.ray/auth_token, created with a random 256-bit token readable only by its
    owner.  The token is never printed."""
    import secrets

    if os.environ.get("RAY_AUTH_TOKEN"):
        return "RAY_AUTH_TOKEN"
    named = os.environ.get("RAY_AUTH_TOKEN_PATH")
    if named:
        if not os.path.isfile(os.path.expanduser(named)):
            raise RuntimeError(f"RAY_AUTH_TOKEN_PATH={named}: no such file")
        return named
    path = os.path.join(os.path.expanduser("~"), ".ray", "auth_token")
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # a concurrent start keeps the first
    except FileExistsError:
        return path
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))
    return path


def resolve_address(address: str | None) -> str | None:
    """The cluster to join: the explicit address, else RAY_ADDRESS, else None (embedded)."""
    address = address or os.environ.get("RAY_ADDRESS") or None
    return None if address in (None, "", "local") else address


def connect(address: str | None = None, *, num_cpus: int | None = None,
            runtime_env: dict | None = None, dashboard: bool = True) -> dict:
    """Start or join Ray for this driver; returns a small description of what it joined.

    Embedded clusters bind to 127.0.0.1, dashboard included (Ray Train's controller watchdog
    needs its state API).  A process joins one cluster: once connected, no address (or the same
    one) reuses the connection and another address is an error.
    """
    import ray

    global _joined, _embedded
    ensure_token_auth()
    target = resolve_address(address)
    if ray.is_initialized():
        current = ray.get_runtime_context().gcs_address
        # Only an explicit address is checked: inside Ray jobs and workers RAY_ADDRESS is Ray's own.
        asked = target if address else None
        if asked and _normalise(asked) not in {_normalise(current), _normalise(_joined or current)}:
            raise RuntimeError(
                f"this process is already connected to the Ray cluster at {_joined or current}; it cannot "
                f"also join {asked}. Run the job against {asked} in a new process, or leave the address "
                "empty to use the current cluster")
        return {"address": current, "embedded": False}
    common = dict(logging_level=logging.WARNING, log_to_driver=True)
    if target:
        if not target.startswith("ray://"):
            # the job's processes name their cluster: Ray Train's PlacementGroupCleaner asks the State
            # API, which otherwise refuses to pick when this machine runs more than one Ray instance,
            # and a dead trial's placement group is then never removed
            env = {"RAY_ADDRESS": target, **((runtime_env or {}).get("env_vars") or {})}
            runtime_env = {**(runtime_env or {}), "env_vars": env}
        with loopback_only() if is_loopback(target) else contextlib.nullcontext():
            ray.init(address=target, runtime_env=runtime_env, **common)
        _joined = target
        return {"address": target, "embedded": False}
    # every process of an embedded cluster's job inherits this: deprecation notices of Ray's,
    # DeepSpeed's and torch's internals, which the person running the job can do nothing about,
    # stay out of its console (a submitted job's environment is the submitter's to set)
    env_vars = {"PYTHONWARNINGS": os.environ.get("PYTHONWARNINGS", "ignore::DeprecationWarning,ignore::FutureWarning"),
                **((runtime_env or {}).get("env_vars") or {})}
    for attempt in range(3):
        # The GCS port is chosen here, so that every process of the job can be told its cluster's
        # address (RAY_ADDRESS).  Without it, Ray Train's PlacementGroupCleaner asks the State API for
        # "the" cluster and fails with "Found multiple active Ray instances" whenever another job's
        # embedded cluster runs on the same machine.
        port = free_port()
        env_vars["RAY_ADDRESS"] = f"{LOOPBACK}:{port}"
        try:
            with loopback_only():
                os.environ["RAY_GCS_SERVER_PORT"] = str(port)
                ray.init(num_cpus=num_cpus, include_dashboard=dashboard, dashboard_host=LOOPBACK,
                         _node_ip_address=LOOPBACK, runtime_env={**(runtime_env or {}), "env_vars": env_vars},
                         **common)
            break
        except Exception as error:  # the port was taken between the probe and the GCS binding it
            if attempt == 2 or "port" not in str(error).lower():
                raise
            ray.shutdown()
        finally:
            os.environ.pop("RAY_GCS_SERVER_PORT", None)
    _embedded = ray.get_runtime_context().gcs_address
    return {"address": _embedded, "embedded": True}


# Ray 2.60 replaces a node address of 127.0.0.1 by the machine's own address, and its servers
# (GCS, raylet, core workers, agents, metrics exporters) then listen on every interface.  Its
# switch for single-machine clusters keeps the node on loopback, and every one of those servers
# binds 127.0.0.1 (tests/test_cluster_unit.py lists them).  It is read by each Ray process at
# start, so it is set while the cluster's processes are started, and in this process's constants.
SINGLE_MACHINE_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


def is_loopback(address: str) -> bool:
    """Is `address` a cluster that listens on loopback only (an embedded one, `lmjobs cluster up`)?
    Joining one, this driver must stay on 127.0.0.1 too, or Ray looks for the GCS at the
    machine's own address.  A cluster on 127.0.0.1 that also listens on that address (a plain
    `ray start --head`) is joined as Ray does by default."""
    import socket

    from ray._private.services import node_ip_address_from_perspective  # private; ray pinned to 2.60.*

    host, _, port = address.split("://")[-1].rpartition(":")
    if host.strip("[]") not in ("127.0.0.1", "localhost", "::1") or not port.isdigit():
        return False
    own = node_ip_address_from_perspective()
    if own.startswith("127.") or own == "::1":
        return True
    try:
        socket.create_connection((own, int(port)), timeout=1).close()
    except OSError:
        return True
    return False


@contextlib.contextmanager
def loopback_only():
    """Ray processes started inside this block bind only to 127.0.0.1 (a single-machine cluster)."""
    from ray._private import ray_constants  # private; ray is pinned to 2.60.*

    saved_env = {k: os.environ.get(k) for k in SINGLE_MACHINE_ENV}
    saved_flag = ray_constants.ENABLE_RAY_CLUSTER
    os.environ.update(SINGLE_MACHINE_ENV)
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved_flag
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


_handed_out: set[int] = set()


def free_port() -> int:
    """A TCP port free on the loopback interface now, and not one this process handed out before:
    several asked for in a row (a node's GCS, client server, agent ports) are never the same one,
    which the OS may otherwise give again once the probing socket is closed (seen: `ray start`
    refusing its own GCS port as the client server's)."""
    import socket

    while True:
        with socket.socket() as s:
            s.bind((LOOPBACK, 0))
            port = s.getsockname()[1]
        if port not in _handed_out:
            _handed_out.add(port)
            return port


def is_embedded() -> bool:
    """Whether this process's Ray is a cluster that this process started on this machine."""
    import ray

    return ray.is_initialized() and _embedded == ray.get_runtime_context().gcs_address


def _normalise(address: str) -> str:
    """host:port with loopback spelt one way, so `localhost:6379` and `127.0.0.1:6379` compare equal."""
    scheme, sep, rest = address.strip().rstrip("/").rpartition("://")
    host, _, port = rest.rpartition(":")
    host = host.strip("[]").lower()
    if host in LOOPBACK_NAMES or host.startswith("127."):
        host = LOOPBACK
    return f"{scheme}{sep}{host}:{port}"


def disconnect() -> None:
    global _joined
    import ray

    _joined = None
    if ray.is_initialized():
        ray.shutdown()
