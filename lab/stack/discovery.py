"""Service discovery for the local stack: Prometheus' config and the file_sd files of the workers
and their exporters, rewritten as workers come and go (the scaler's direct scrapes read the same)."""

from __future__ import annotations

import json
from pathlib import Path

from lab.stack.workers import WorkerFleet

NAMESPACE, DEPLOYMENT = "local", "sd-worker"
SELECTOR = f'namespace="{NAMESPACE}",deployment="{DEPLOYMENT}"'


def prometheus_config(targets_file: str, exporters_file: str, scaler_address: str) -> str:
    """A Prometheus config scraping the workers, their exporters and the scaler every second."""
    return json.dumps({
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [
            {"job_name": "diffusion-worker", "scrape_timeout": "1s",
             "file_sd_configs": [{"files": [targets_file], "refresh_interval": "1s"}]},
            # The exporters label their series with their worker as the pod: keep those labels.
            {"job_name": "diffusion-gpu-exporter", "honor_labels": True, "scrape_timeout": "1s",
             "file_sd_configs": [{"files": [exporters_file], "refresh_interval": "1s"}]},
            {"job_name": "diffusion-scaler", "honor_labels": True, "scrape_timeout": "1s",
             "static_configs": [{"targets": [scaler_address]}]},
        ],
    })


def write_targets(path: Path, exporters_path: Path, fleet: WorkerFleet, direct: bool) -> None:
    """The file discovery of the workers (and of their exporters: a file of their own for
    Prometheus, the same file for the scaler's direct scrapes)."""
    workers = [{"targets": [w.address], "labels": {"namespace": NAMESPACE, "deployment": DEPLOYMENT, "pod": w.name}}
               for w in fleet.workers if w.alive()]
    exporters = [{"targets": [address], "labels": {"namespace": NAMESPACE, "deployment": DEPLOYMENT}}
                 for address, _ in fleet.exporter_addresses()]
    files = {path: workers + exporters} if direct else {path: workers, exporters_path: exporters}
    for target, groups in files.items():
        scratch = target.with_suffix(".tmp")
        scratch.write_text(json.dumps(groups))
        scratch.replace(target)  # atomic: a reader never sees half a file
