# syntax=docker/dockerfile:1
# The four deployables, one target each (docs/IMAGES.md):
#   scaler, exporter, gateway   one light stage, no torch, different entrypoints
#   worker                      torch (TORCH_VARIANT cuda or cpu), diffusers
# Non-root (UID 10001), nothing written outside the volumes the manifests mount: /tmp (HOME,
# TMPDIR and every cache), /models and the compile cache for the worker.
#
#   docker build --target scaler -t REGISTRY/diffusion-autoscaler-scaler:0.1.0 .
#   docker build --target worker -t REGISTRY/diffusion-autoscaler-worker:0.1.0 .     # CUDA torch
#   docker build --target worker --build-arg TORCH_VARIANT=cpu -t ...-worker:0.1.0-cpu .
#
# `make image-test` builds every target with buildah from a Debian base made locally
# (tools/image-test.sh), because no registry is reachable where it runs.

# Any Debian bookworm with Python 3.11 and its venv module at `python3`: the public image below,
# or tools/image-test.sh's debootstrap of bookworm plus its python3.
ARG BASE_IMAGE=docker.io/library/python:3.11-slim-bookworm
# The worker's torch: cuda (production) or cpu (tests, laptops).
ARG TORCH_VARIANT=cuda

# Torch wheels to install from instead of an index. Empty unless a build context of this name
# replaces it (`--build-context torch-wheels=DIR`, buildah and BuildKit alike).
FROM scratch AS torch-wheels

# What every image shares: the user, and an environment that writes only under /tmp.
FROM ${BASE_IMAGE} AS runtime
ARG VERSION=0.1.0
ARG REVISION=unknown
ARG SOURCE_URL=unknown
LABEL org.opencontainers.image.vendor="diffusion-autoscaler" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.source="${SOURCE_URL}" \
      org.opencontainers.image.licenses="Apache-2.0"
# A fixed numeric UID and GID, so that the kubelet can check runAsNonRoot against the image, and
# a passwd entry, because getpass.getuser() (torch's inductor cache) needs one.
RUN useradd --uid 10001 --user-group --no-create-home --no-log-init --home-dir /tmp \
        --shell /usr/sbin/nologin diffusion
# /tmp is a volume in every manifest (an emptyDir): the home and every cache live there, so the
# root filesystem can be read-only. Bytecode is compiled at install time, never at run time.
ENV PATH=/opt/venv/bin:${PATH} \
    HOME=/tmp \
    TMPDIR=/tmp \
    XDG_CACHE_HOME=/tmp/.cache \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    LANG=C.UTF-8

# The virtual environment is made here and copied whole into the runtime stages; the sources
# and the wheels built from them stay behind. Dependencies go in before the sources, from
# pyproject.toml alone, so that a change to the code does not reinstall them.
FROM runtime AS build
COPY pyproject.toml /src/
RUN python3 -m venv /opt/venv \
 && python3 -c 'import tomllib; project = tomllib.load(open("/src/pyproject.toml", "rb"))["project"]; \
        [open(f"/src/requirements-{extra}.txt", "w").write( \
             "\n".join(project["dependencies"] + project["optional-dependencies"][extra]) + "\n") \
         for extra in ("gateway", "worker")]'

# The scaler and the exporter need only the base dependencies; the gateway adds FastAPI.
FROM build AS light-build
RUN pip install --no-cache-dir --requirement /src/requirements-gateway.txt
# .dockerignore lets in only the distribution: pyproject.toml, README.md and the packages.
COPY . /src
RUN pip install --no-cache-dir --no-deps /src && pip check

FROM build AS worker-build
ARG TORCH_VARIANT
ARG TORCH_VERSION=2.13.0
# Empty: the variant's default. cuda: PyPI, whose Linux wheels are the CUDA build (a PyTorch index
# such as https://download.pytorch.org/whl/cu128 picks another CUDA); cpu: PyTorch's CPU index.
ARG TORCH_INDEX_URL=
# Torch first, from the variant's source; the worker's requirement on torch is then met.
RUN --mount=type=bind,from=torch-wheels,target=/wheels \
    set -eu; \
    case "${TORCH_VARIANT}" in \
      cuda) spec="torch==${TORCH_VERSION}"; index="${TORCH_INDEX_URL}" ;; \
      cpu) spec="torch==${TORCH_VERSION}+cpu"; index="${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}" ;; \
      *) echo "TORCH_VARIANT must be cuda or cpu, not '${TORCH_VARIANT}'" >&2; exit 2 ;; \
    esac; \
    if ls /wheels/torch-*.whl >/dev/null 2>&1; then \
      pip install --no-cache-dir --find-links /wheels "${spec}"; \
    else \
      pip install --no-cache-dir ${index:+--extra-index-url "${index}"} "${spec}"; \
    fi; \
    python -c "import torch; assert torch.__version__.startswith('${TORCH_VERSION}'), torch.__version__; \
               assert (torch.version.cuda is not None) == ('${TORCH_VARIANT}' == 'cuda'), torch.version.cuda"
RUN pip install --no-cache-dir --requirement /src/requirements-worker.txt
COPY . /src
RUN pip install --no-cache-dir --no-deps /src && pip check

# The scaler, the exporter and the gateway: one stage without torch, three entrypoints.
FROM runtime AS light
COPY --from=light-build /opt/venv /opt/venv
USER 10001:10001

FROM light AS scaler
LABEL org.opencontainers.image.title="diffusion-autoscaler-scaler" \
      org.opencontainers.image.description="KEDA external scaler: GPU utilization, queue and p95 latency as one composite replica metric"
EXPOSE 6000 9102
ENTRYPOINT ["python", "-m", "adapter"]

FROM light AS exporter
LABEL org.opencontainers.image.title="diffusion-autoscaler-exporter" \
      org.opencontainers.image.description="GPU exporter: NVML readings under dcgm-exporter's names, as a sidecar or a DaemonSet"
EXPOSE 9400
ENTRYPOINT ["python", "-m", "exporter"]

FROM light AS gateway
LABEL org.opencontainers.image.title="diffusion-autoscaler-gateway" \
      org.opencontainers.image.description="Front door that holds image requests on a Redis stream while no worker exists"
EXPOSE 8080
ENTRYPOINT ["python", "-m", "gateway"]

# On CUDA the worker compiles its UNet with torch.compile, whose Triton kernels are built at run
# time by a C compiler against Python's headers: the cuda variant carries both, the cpu variant
# (which never compiles) neither.
FROM runtime AS worker-runtime-cpu

FROM runtime AS worker-runtime-cuda
RUN set -eu; \
    headers="$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["include"])')/Python.h"; \
    apt-get update; \
    apt-get install --yes --no-install-recommends gcc libc6-dev $([ -f "${headers}" ] || echo python3-dev); \
    rm -rf /var/lib/apt/lists/*; \
    test -f "${headers}"; \
    gcc --version >/dev/null

FROM worker-runtime-${TORCH_VARIANT} AS worker
COPY --from=worker-build /opt/venv /opt/venv
# No model hub at run time: the model is a local directory (a volume, or `make-model`'s output).
ENV HF_HOME=/tmp/huggingface \
    HF_HUB_OFFLINE=1 \
    HF_HUB_DISABLE_TELEMETRY=1
LABEL org.opencontainers.image.title="diffusion-autoscaler-worker" \
      org.opencontainers.image.description="Diffusers inference worker with dynamic batching and honest load metrics"
USER 10001:10001
EXPOSE 8000
ENTRYPOINT ["python", "-m", "worker"]
CMD ["serve"]
