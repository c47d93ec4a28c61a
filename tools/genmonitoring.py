"""Writes the generated monitoring manifests: the Grafana dashboard and the PrometheusRule.

- manifests/monitoring/dashboards/diffusion-autoscaler.json, from the panels below;
- manifests/overlays/prometheus-operator/prometheusrule.yaml, the rule file's groups wrapped
  for prometheus-operator, so the plain file stays the one source.

Run `python tools/genmonitoring.py` after editing either; a test fails while they differ.
"""

from __future__ import annotations

import json
import pathlib

ROOT = pathlib.Path(__file__).resolve().parent.parent
OUT = ROOT / "manifests" / "monitoring" / "dashboards" / "diffusion-autoscaler.json"
RULES = ROOT / "manifests" / "monitoring" / "rules" / "diffusion-autoscaler.rules.yaml"
PROMETHEUS_RULE = ROOT / "manifests" / "overlays" / "prometheus-operator" / "prometheusrule.yaml"

SO = 'namespace="$namespace",scaledobject="$scaledobject"'
DEP = 'namespace="$namespace",deployment="$deployment"'

# (title, unit, [(expr, legend)], kind)
PANELS = [
    ("Composite, before and after stabilization, and each signal's proposal", "short", [
        (f"scaler_composite_replicas{{{SO}}}", "composite (before stabilization)"),
        (f"scaler_desired_replicas{{{SO}}}", "served to KEDA (after stabilization)"),
        (f"scaler_proposal_replicas{{{SO}}}", "proposal: {{signal}}"),
    ], "timeseries"),
    ("Replicas: desired vs ready", "short", [
        (f"scaler_desired_replicas{{{SO}}}", "desired"),
        (f"deployment:diffusion_ready:sum{{{DEP}}}", "ready"),
    ], "timeseries"),
    ("Queue", "short", [
        (f"deployment:diffusion_requests_in_flight:sum{{{DEP}}}", "requests in flight"),
        (f"deployment:diffusion_queue_depth:sum{{{DEP}}}", "images waiting"),
    ], "timeseries"),
    ("Latency", "s", [
        (f"deployment:diffusion_request_duration_seconds:p95_1m{{{DEP}}}", "p95 request"),
        (f"histogram_quantile(0.95, sum by (le) (rate(diffusion_queue_wait_seconds_bucket{{{DEP}}}[1m])))",
         "p95 queue wait"),
    ], "timeseries"),
    ("GPU utilization per pod (NVML samples)", "percent", [
        (f"DCGM_FI_DEV_GPU_UTIL{{{DEP}}}", "{{pod}} gpu {{gpu}}"),
    ], "timeseries"),
    ("SM activity per pod (GPM)", "percentunit", [
        (f"DCGM_FI_PROF_SM_ACTIVE{{{DEP}}}", "{{pod}} gpu {{gpu}}"),
    ], "timeseries"),
    ("Pipeline busy fraction", "percentunit", [
        (f"deployment:diffusion_busy:ratio1m{{{DEP}}}", "busy"),
    ], "timeseries"),
    ("Batch size distribution", "short", [
        (f"sum by (le) (increase(diffusion_batch_size_bucket{{{DEP}}}[$__rate_interval]))", "{{le}}"),
    ], "heatmap"),
    ("Images per second", "short", [
        (f"deployment:diffusion_images:rate1m{{{DEP}}}", "images/s"),
    ], "timeseries"),
    ("Scaler health", "short", [
        ('sum(up{job="diffusion-scaler"})', "scalers up"),
        (f"max(scaler_stale{{{SO}}})", "stale"),
        (f"max(scaler_value_age_seconds{{{SO}}})", "value age (s)"),
        (f'sum(rate(scaler_refreshes_total{{{SO},result="error"}}[5m]))', "failed refreshes/s"),
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
            variable("namespace", "label_values(scaler_desired_replicas, namespace)"),
            variable("scaledobject", 'label_values(scaler_desired_replicas{namespace="$namespace"}, scaledobject)'),
            variable("deployment", 'label_values(diffusion_ready{namespace="$namespace"}, deployment)'),
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
