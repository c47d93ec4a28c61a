"""Writes the generated monitoring manifests: the Grafana dashboard and the PrometheusRule.

- manifests/monitoring/dashboards/diffusion-autoscaler.json, from the panels below;
- manifests/overlays/prometheus-operator/prometheusrule.yaml, the rule file's groups wrapped
  for prometheus-operator, so the plain file stays the one source.

Metric names come from `contract.names`. Run `python tools/genmonitoring.py` after editing
either; a test fails while they differ.
"""

from __future__ import annotations

import json
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as a script: the contract is importable from a checkout

from contract import names as n  # noqa: E402 - every metric name comes from the contract
OUT = ROOT / "manifests" / "monitoring" / "dashboards" / "diffusion-autoscaler.json"
RULES = ROOT / "manifests" / "monitoring" / "rules" / "diffusion-autoscaler.rules.yaml"
PROMETHEUS_RULE = ROOT / "manifests" / "overlays" / "prometheus-operator" / "prometheusrule.yaml"

SO = 'namespace="$namespace",scaledobject="$scaledobject"'
DEP = 'namespace="$namespace",deployment="$deployment"'

# (title, unit, [(expr, legend)], kind)
PANELS = [
    ("Composite, before and after stabilization, and each signal's proposal", "short", [
        (f"{n.SCALER_COMPOSITE}{{{SO}}}", "composite (before stabilization)"),
        (f"{n.SCALER_DESIRED}{{{SO}}}", "served to KEDA (after stabilization)"),
        (f"{n.SCALER_PROPOSAL}{{{SO}}}", "proposal: {{signal}}"),
    ], "timeseries"),
    ("Replicas: desired vs ready", "short", [
        (f"{n.SCALER_DESIRED}{{{SO}}}", "desired"),
        (f"deployment:{n.READY}:sum{{{DEP}}}", "ready"),
    ], "timeseries"),
    ("Queue", "short", [
        (f"deployment:{n.REQUESTS_IN_FLIGHT}:sum{{{DEP}}}", "requests in flight"),
        (f"deployment:{n.QUEUE_DEPTH}:sum{{{DEP}}}", "images waiting"),
    ], "timeseries"),
    ("Latency", "s", [
        (f"deployment:{n.REQUEST_DURATION}:p95_1m{{{DEP}}}", "p95 request"),
        (f"histogram_quantile(0.95, sum by (le) (rate({n.QUEUE_WAIT}_bucket{{{DEP}}}[1m])))",
         "p95 queue wait"),
    ], "timeseries"),
    ("GPU utilization per pod (NVML samples)", "percent", [
        (f"{n.GPU_UTIL}{{{DEP}}}", "{{pod}} gpu {{gpu}}"),
    ], "timeseries"),
    ("SM activity per pod (GPM)", "percentunit", [
        (f"{n.PROF_SM_ACTIVE}{{{DEP}}}", "{{pod}} gpu {{gpu}}"),
    ], "timeseries"),
    ("Pipeline busy fraction", "percentunit", [
        (f"deployment:diffusion_busy:ratio1m{{{DEP}}}", "busy"),
    ], "timeseries"),
    ("Batch size distribution", "short", [
        (f"sum by (le) (increase({n.BATCH_SIZE}_bucket{{{DEP}}}[$__rate_interval]))", "{{le}}"),
    ], "heatmap"),
    ("Images per second", "short", [
        (f"deployment:{n.IMAGES}:rate1m{{{DEP}}}", "images/s"),
    ], "timeseries"),
    ("Scaler health", "short", [
        ('sum(up{job="diffusion-scaler"})', "scalers up"),
        (f"max({n.SCALER_STALE}{{{SO}}})", "stale"),
        (f"max({n.SCALER_VALUE_AGE}{{{SO}}})", "value age (s)"),
        (f'sum(rate({n.SCALER_REFRESHES}_total{{{SO},result="error"}}[5m]))', "failed refreshes/s"),
    ], "timeseries"),
    # The capacity signal's measurements as the workers export them, so the panels show whether
    # or not a ScaledObject enables the signal (its scaler_demand_... gauges exist only where it does).
    ("Demand vs capacity x ready replicas (image-steps/s)", "short", [
        (f"sum(rate({n.REQUESTED_IMAGE_STEPS}_total{{{DEP}}}[1m]))", "demand"),
        (f"sum({n.CAPACITY_IMAGE_STEPS}{{{DEP}}} * {n.READY}{{{DEP}}})", "capacity x ready replicas"),
    ], "timeseries"),
    ("Start-up per pod: process start to ready", "s", [
        (f"{n.STARTUP_SECONDS}{{{DEP}}}", "{{pod}}"),
    ], "timeseries"),
]


def variable(name: str, query: str) -> dict:
    return {
        "name": name, "label": name, "type": "query", "datasource": {"type": "prometheus", "uid": "${datasource}"},
        "query": {"query": query, "refId": f"{name}-var"}, "refresh": 2, "sort": 1,
    }


def dashboard() -> dict:
    panels = []
    for index, (title, unit, targets, kind) in enumerate(PANELS):
        panels.append({
            "id": index + 1,
            "type": kind,
            "title": title,
            "datasource": {"type": "prometheus", "uid": "${datasource}"},
            "gridPos": {"h": 8, "w": 12, "x": 12 * (index % 2), "y": 8 * (index // 2)},
            "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
            "targets": [
                {"refId": chr(ord("A") + n), "expr": expr, "legendFormat": legend,
                 **({"format": "heatmap"} if kind == "heatmap" else {})}
                for n, (expr, legend) in enumerate(targets)
            ],
        })
    return {
        "uid": "diffusion-autoscaler",
        "title": "Diffusion autoscaler",
        "tags": ["diffusion-autoscaler", "keda", "gpu"],
        "timezone": "browser",
        "schemaVersion": 39,
        "version": 1,
        "refresh": "10s",
        "time": {"from": "now-1h", "to": "now"},
        "templating": {"list": [
            {"name": "datasource", "label": "Prometheus", "type": "datasource", "query": "prometheus"},
            variable("namespace", f"label_values({n.SCALER_DESIRED}, namespace)"),
            variable("scaledobject", f'label_values({n.SCALER_DESIRED}{{namespace="$namespace"}}, scaledobject)'),
            variable("deployment", f'label_values({n.READY}{{namespace="$namespace"}}, deployment)'),
        ]},
        "panels": panels,
    }


def render() -> str:
    return json.dumps(dashboard(), indent=2) + "\n"


def render_prometheus_rule() -> str:
    import yaml

    groups = yaml.safe_load(RULES.read_text())["groups"]
    rule = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {"name": "diffusion-autoscaler", "labels": {"app.kubernetes.io/name": "diffusion-autoscaler"}},
        "spec": {"groups": groups},
    }
    header = "# Generated by tools/genmonitoring.py from manifests/monitoring/rules/diffusion-autoscaler.rules.yaml.\n"
    return header + yaml.safe_dump(rule, sort_keys=False, width=120)


if __name__ == "__main__":
    for path, text in ((OUT, render()), (PROMETHEUS_RULE, render_prometheus_rule())):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        print(f"wrote {path.relative_to(ROOT)}")
