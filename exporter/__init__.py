"""The GPU exporter (NVML -> Prometheus, dcgm-exporter-compatible names). Built in its own issue."""
