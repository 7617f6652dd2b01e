"""The Serve ingress modes: the environment each selects for the Ray processes."""

import os

import pytest

from raydetect.config import ConfigError, ServeConfig, validate
from raydetect.serve_ingress import (
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
