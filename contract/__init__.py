"""The contract below the three deployables: metric, label and signal names, buckets, and the
small helpers (the /metrics HTTP server, flag and environment parsing) that the scaler, the
worker and the exporter share. It imports none of them; each of them may import it."""
