"""ExporterConfig: the flags parsed once, the interval-derived defaults resolved, bad values named by flag."""

from __future__ import annotations

import pytest

from exporter.__main__ import build_parser
from exporter.config import ExporterConfig


def config_of(*flags: str) -> ExporterConfig:
    return ExporterConfig.from_args(build_parser().parse_args(list(flags)))


def test_the_flag_defaults_are_the_config_defaults(monkeypatch):
    import os

    for name in [n for n in os.environ if n.startswith("EXPORTER_")] + ["NODE_NAME"]:
        monkeypatch.delenv(name, raising=False)
    assert config_of() == ExporterConfig()


@pytest.mark.parametrize(
    ("interval_s", "collect_timeout_s", "stale_after_s"),
    [(1.0, 0.8, 3.0), (0.1, 0.5, 0.3), (10.0, 8.0, 30.0)],
)
def test_timeout_and_staleness_follow_the_interval_unless_given(interval_s, collect_timeout_s, stale_after_s):
    config = ExporterConfig(interval_s=interval_s)
    assert config.collect_timeout_s == pytest.approx(collect_timeout_s)
    assert config.stale_after_s == pytest.approx(stale_after_s)


def test_given_timeout_and_staleness_are_kept():
    config = config_of("--interval", "2", "--collect-timeout", "0.3", "--stale-after", "20")
    assert (config.interval_s, config.collect_timeout_s, config.stale_after_s) == (2.0, 0.3, 20.0)


def test_environment_variables_reach_the_config(monkeypatch):
    monkeypatch.setenv("EXPORTER_MODE", "daemonset")
    monkeypatch.setenv("EXPORTER_POD_RESOURCES_TTL", "4")
    monkeypatch.setenv("EXPORTER_PER_PROCESS", "yes")
    config = config_of()
    assert (config.mode, config.pod_resources_ttl_s, config.per_process) == ("daemonset", 4.0, True)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("interval_s", 0.0, "--interval must be above 0 seconds, got 0"),
        ("collect_timeout_s", -1.0, "--collect-timeout must be above 0 seconds, got -1"),
        ("stale_after_s", float("nan"), "--stale-after must be above 0 seconds, got nan"),
        ("pod_resources_ttl_s", 0.0, "--pod-resources-ttl must be above 0 seconds, got 0"),
        ("port", 70000, "--port must be a port number, 0 to 65535, got 70000"),
        ("mode", "node", "--mode must be one of sidecar, daemonset, got 'node'"),
        ("log_level", "trace", "--log-level must be one of debug, info, warning, error, got 'trace'"),
    ],
)
def test_a_bad_value_is_refused_naming_its_flag(field, value, message):
    with pytest.raises(ValueError) as refused:
        ExporterConfig(**{field: value})
    assert str(refused.value) == message


def test_the_config_is_frozen():
    with pytest.raises(AttributeError):
        ExporterConfig().interval_s = 2.0  # type: ignore[misc]
