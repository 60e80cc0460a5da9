"""cluster.connect against the session's shared Ray cluster: a process joins one cluster."""
import pytest

from cluster.connect import _normalise, connect


@pytest.mark.ray
def test_connect_reuses_the_same_cluster_and_refuses_another(ray_cluster):
    import ray

    host, port = ray_cluster.rsplit(":", 1)
    for same in (None, "", ray_cluster):
        assert connect(same)["address"] == ray_cluster
    # nothing is sent to the other address: the check comes before any connection attempt
    with pytest.raises(RuntimeError) as err:
        connect("10.255.255.1:6379")
    assert ray_cluster in str(err.value) and "10.255.255.1:6379" in str(err.value)
    with pytest.raises(RuntimeError, match="already connected"):
        connect(f"{host}:{int(port) + 1}")
    assert ray.is_initialized() and ray.get_runtime_context().gcs_address == ray_cluster


def test_loopback_addresses_compare_equal():
    assert _normalise("localhost:6379") == _normalise("127.0.0.1:6379") == _normalise("[::1]:6379/")
    assert _normalise("ray://LOCALHOST:10001") == _normalise("ray://127.0.0.1:10001")
    assert _normalise("10.0.0.5:6379") not in (_normalise("127.0.0.1:6379"), _normalise("10.0.0.5:6380"))


def test_a_fresh_machine_gets_a_private_token_before_ray_start(tmp_path, monkeypatch):
    """`ray start --head` in token mode refuses to start without a token; `cluster up` makes one."""
    import os
    import stat

    from cluster.connect import ensure_local_token

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    path = ensure_local_token()
    assert path == str(tmp_path / ".ray" / "auth_token")
    token = (tmp_path / ".ray" / "auth_token").read_text()
    assert len(token) == 64 and int(token, 16) > 0
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert ensure_local_token() == path and (tmp_path / ".ray" / "auth_token").read_text() == token  # kept
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "absent"))
    with pytest.raises(RuntimeError, match="RAY_AUTH_TOKEN_PATH"):
        ensure_local_token()
