"""Generated gRPC code for the kubelet PodResources API; regenerate with `make protos`."""
