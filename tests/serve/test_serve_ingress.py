"""The Serve ingress modes: the environment each selects for the Ray processes."""

import os

import pytest

from raydetect.config import ConfigError, ServeConfig, validate
from raydetect.serve.ingress import (
    DRAIN_ENV,
    HAPROXY_STARTUP_ENV,
    READY_ENV,
    ingress_env,
    ingress_from_env,
    use_ingress,
)


def test_modes_and_their_environment():
    assert ingress_env("haproxy") == {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"}
    assert ingress_env("proxy") == {"RAY_SERVE_ENABLE_HA_PROXY": "0", "RAY_SERVE_THROUGHPUT_OPTIMIZED": "0"}
    assert ingress_env("haproxy", drain_s=2.0)[DRAIN_ENV] == "2"
    with pytest.raises(ValueError, match="ingress must be one of haproxy, proxy"):
        ingress_env("nginx")
    assert ingress_from_env({"RAY_SERVE_ENABLE_HA_PROXY": "1"}) == "haproxy"
    assert ingress_from_env({}) == "proxy"


def test_use_ingress_sets_the_environment_and_keeps_a_users_drain_period(monkeypatch):
    for k in ("RAY_SERVE_ENABLE_HA_PROXY", "RAY_SERVE_THROUGHPUT_OPTIMIZED", DRAIN_ENV):
        monkeypatch.delenv(k, raising=False)
    assert use_ingress("proxy", drain_s=1.0)[DRAIN_ENV] == "1"
    assert ingress_from_env() == "proxy" and os.environ[DRAIN_ENV] == "1"
    monkeypatch.setenv(DRAIN_ENV, "45")
    set_now = use_ingress("haproxy", drain_s=1.0)
    assert DRAIN_ENV not in set_now and os.environ[DRAIN_ENV] == "45"
    assert ingress_from_env() == "haproxy" and os.environ["RAY_SERVE_THROUGHPUT_OPTIMIZED"] == "1"


def test_use_ingress_gives_a_starting_proxy_time_and_keeps_a_users_setting(monkeypatch):
    for name in (READY_ENV, HAPROXY_STARTUP_ENV):
        monkeypatch.delenv(name, raising=False)
    set_now = use_ingress("haproxy")
    assert set_now[READY_ENV] == set_now[HAPROXY_STARTUP_ENV] == "60" and os.environ[READY_ENV] == "60"
    monkeypatch.setenv(READY_ENV, "7")
    assert READY_ENV not in use_ingress("haproxy") and os.environ[READY_ENV] == "7"


def test_config_field_is_checked():
    cfg = validate(ServeConfig, {"detector": {"model": "m.onnx"}}, "serve")
    assert cfg.ingress == "haproxy"
    with pytest.raises(ConfigError, match=r"serve\.ingress"):
        validate(ServeConfig, {"detector": {"model": "m.onnx"}, "ingress": "nginx"}, "serve")


def test_an_instance_started_from_an_isolated_environment_runs_the_real_haproxy(tmp_path, monkeypatch):
    """A `raydetect serve` started from an environment that is itself isolated (another
    instance, or the test suite's Ray) inherits RAY_SERVE_HAPROXY_BINARY_PATH = that
    environment's wrapper. Its own wrapper must exec HAProxy, not the inherited wrapper (which
    would exec itself forever: HAProxy never starts and Serve's proxy is never ready)."""
    import subprocess

    from raydetect.serve import haproxy as serve_haproxy
    from raydetect.serve.ingress import isolation_env

    try:
        real = serve_haproxy.real_binary()
    except FileNotFoundError:
        pytest.skip("no HAProxy binary here")
    outer = isolation_env(20000, 1, tmp_path / "outer")
    assert serve_haproxy.is_wrapper(outer["RAY_SERVE_HAPROXY_BINARY_PATH"]) and outer[serve_haproxy.ENV_BINARY] == real
    for k, v in outer.items():
        monkeypatch.setenv(k, v)
    inner = isolation_env(20100, 1, tmp_path / "inner")
    assert inner[serve_haproxy.ENV_BINARY] == real
    assert inner["RAY_SERVE_HAPROXY_BINARY_PATH"] != outer["RAY_SERVE_HAPROXY_BINARY_PATH"]
    # the wrapper chain as Ray runs it: `haproxy -v` answers at once with HAProxy's version
    out = subprocess.run([inner["RAY_SERVE_HAPROXY_BINARY_PATH"], "-v"], env={**os.environ, **inner},
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "HAProxy version" in out.stdout, out.stderr
    # and a wrapper told to run a wrapper refuses instead of looping
    bad = {**os.environ, **inner, serve_haproxy.ENV_BINARY: outer["RAY_SERVE_HAPROXY_BINARY_PATH"]}
    out = subprocess.run([inner["RAY_SERVE_HAPROXY_BINARY_PATH"], "-v"], env=bad, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode != 0 and "is a wrapper, not HAProxy" in out.stderr
