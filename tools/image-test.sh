#!/usr/bin/env bash
# `make image-test`: builds every image target of the Dockerfile with buildah and runs each the way
# the manifests run it: as UID 10001, on a read-only root filesystem with /tmp (and /models) as
# the only writable volumes, every capability dropped, no_new_privs set.
#   - the scaler answers the gRPC health check SERVING on a loopback port, /healthz too, and
#     exits 0 on SIGTERM;
#   - the exporter and the gateway print --help; none of the three light images holds torch;
#   - the worker (CPU torch) builds the tiny random-weight model into a /models volume, serves
#     it, answers one POST with a PNG, and exits 0 on SIGTERM;
#   - the CUDA worker's runtime stage (its torch is gigabytes and not built here) builds and
#     imports a C extension against Python's headers under the same constraints, as Triton must.
# Prints how long each phase took. No container registry is needed: the base image is Debian
# bookworm with its python3, made here with debootstrap and cached (IMAGE_CACHE_DIR).
#
# Needs root (debootstrap, buildah's vfs storage, mount namespaces), apt-get for what is missing
# (buildah, debootstrap), the Debian mirror and PyPI. Environment:
#   IMAGE_CACHE_DIR   base rootfs tarball and buildah storage (default /var/cache/diffusion-autoscaler-image)
#   DEBIAN_MIRROR     for debootstrap (default http://deb.debian.org/debian)
#   TORCH_WHEEL_DIR   a directory holding torch-<version>+cpu for cp311 (default: pip's find-links;
#                     without one the build downloads it from PyTorch's CPU index)
#   PYTHON            runs the host-side checks, with grpcio (default .venv/bin/python)
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-.venv/bin/python}
CACHE_DIR=${IMAGE_CACHE_DIR:-/var/cache/diffusion-autoscaler-image}
DEBIAN_MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
SUITE=bookworm  # Python 3.11, as the cp311 wheels and the project's own interpreter
# The base: minbase plus the interpreter, its venv module (the build makes a venv) and CA
# certificates (pip over HTTPS). Changing this list makes a new base (its tag hashes the recipe).
BASE_PACKAGES=python3,python3-venv,ca-certificates
STORAGE=(--root "$CACHE_DIR/storage" --runroot /run/diffusion-autoscaler-image --storage-driver vfs)
VERSION=$("$PYTHON" -c 'import tomllib; print(tomllib.load(open("pyproject.toml", "rb"))["project"]["version"])')
TORCH_VERSION=$(sed -n 's/^ARG TORCH_VERSION=//p' Dockerfile)

bh() { buildah "${STORAGE[@]}" "$@"; }

phases=()
phase_started=0
phase() {  # phase NAME: ends the phase before, starts this one
  local now; now=$(date +%s)
  if [ -n "${phase_name:-}" ]; then phases+=("$(printf '%-38s %4d s' "$phase_name" $((now - phase_started)))"); fi
  phase_name=$1; phase_started=$now
  [ "$1" = end ] || printf '\n== %s\n' "$1"
}

summary() {
  local status=$1
  phase end
  printf '\n== image-test: %s\n' "$([ $status -eq 0 ] && echo passed || echo "FAILED (exit $status)")"
  printf '%s\n' "${phases[@]}"
  printf '%-38s %4d s\n' total $(( $(date +%s) - run_started ))
  exit $status
}

# The checks this run started in the background, stopped on any exit, and its working
# containers, removed: the storage is this script's own (one run at a time holds its lock).
pids=()
container() {  # container IMAGE: prints the name of a new working container of IMAGE
  bh from --quiet "$1"
}
cleanup() {
  local pid
  for pid in "${pids[@]}"; do
    kill -KILL $(namespace_init "$pid") 2>/dev/null || true  # and with it all of its namespace
    wait "$pid" 2>/dev/null || true
  done
  [ -z "${locked:-}" ] || bh rm --all >/dev/null 2>&1 || true
  [ -z "${scratch:-}" ] || rm -rf "$scratch"
}
trap 'status=$?; cleanup; summary $status' EXIT

run_started=$(date +%s)
phase "tools (apt-get when missing)"
if [ "$(id -u)" -ne 0 ]; then
  echo "image-test needs root: debootstrap, buildah's storage and the mount namespaces the checks run in" >&2
  exit 1
fi
scratch=$(mktemp -d /tmp/image-test.XXXXXX)
missing=()
command -v buildah >/dev/null || missing+=(buildah)
command -v debootstrap >/dev/null || missing+=(debootstrap)
command -v pgrep >/dev/null || missing+=(procps)
command -v git >/dev/null || missing+=(git)
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing ${missing[*]} (Debian packages)"
  export DEBIAN_FRONTEND=noninteractive
  { apt-get install -y -q --no-install-recommends "${missing[@]}" \
    || { apt-get update -q && apt-get install -y -q --no-install-recommends "${missing[@]}"; }; } > "$scratch/apt.log" 2>&1 \
    || { tail -20 "$scratch/apt.log" >&2; exit 1; }
fi
for tool in unshare setpriv chroot flock; do
  command -v "$tool" >/dev/null || { echo "image-test needs $tool (util-linux, coreutils)" >&2; exit 1; }
done
buildah --version
mkdir -p "$CACHE_DIR"
exec 9>"$CACHE_DIR/lock"
flock --nonblock 9 || { echo "another image-test is running on $CACHE_DIR" >&2; exit 1; }
locked=1

phase "base image ($SUITE, debootstrap)"
recipe="$SUITE minbase $BASE_PACKAGES"
base_tag=$SUITE-$(printf '%s' "$recipe" | sha256sum | cut -c1-12)
BASE_IMAGE=localhost/diffusion-autoscaler-base:$base_tag
rootfs_tar=$CACHE_DIR/rootfs-$base_tag.tar
if bh inspect --type image "$BASE_IMAGE" >/dev/null 2>&1; then
  echo "reusing $BASE_IMAGE"
else
  if [ ! -f "$rootfs_tar" ]; then
    echo "debootstrap --variant=minbase --include=$BASE_PACKAGES $SUITE from $DEBIAN_MIRROR"
    rootfs=$scratch/rootfs
    debootstrap --variant=minbase --include="$BASE_PACKAGES" "$SUITE" "$rootfs" "$DEBIAN_MIRROR" > "$scratch/debootstrap.log" 2>&1 \
      || { tail -20 "$scratch/debootstrap.log" >&2; exit 1; }
    # What an image does without, as Debian's own slim images: package lists and archives, docs,
    # manuals, translations, logs. /dev is the runtime's to fill.
    rm -rf "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* \
           "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* "$rootfs"/usr/share/info/* "$rootfs"/var/log/*
    find "$rootfs/usr/share/locale" -mindepth 1 -maxdepth 1 ! -name locale.alias -exec rm -rf {} +
    tar --numeric-owner -C "$rootfs" --exclude='./dev/*' -cf "$rootfs_tar.partial" .
    mv "$rootfs_tar.partial" "$rootfs_tar"
    rm -rf "$rootfs"
  fi
  echo "importing $rootfs_tar as $BASE_IMAGE"
  ctr=$(container scratch)
  bh add "$ctr" "$rootfs_tar" / >/dev/null
  bh config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin --env LANG=C.UTF-8 \
    --cmd /usr/bin/python3 "$ctr"
  bh commit --quiet --rm "$ctr" "$BASE_IMAGE" >/dev/null
fi

# The build context: the files git knows (tracked, or new and not ignored) as they are now, copied
# once, so that every target is built from the same sources even while the tree is being edited.
context=$scratch/context
mkdir "$context"
git ls-files -z --cached --others --exclude-standard \
  | while IFS= read -r -d '' file; do [ -e "$file" ] && printf '%s\0' "$file"; done \
  | tar --null -T - -cf - | tar -C "$context" -xf -
build_args=(--isolation chroot --build-arg "BASE_IMAGE=$BASE_IMAGE" --build-arg "VERSION=$VERSION"
            --build-arg "REVISION=$(git rev-parse HEAD 2>/dev/null || echo unknown)"
            --build-arg "SOURCE_URL=$(git remote get-url origin 2>/dev/null || echo unknown)")
# pip inside the build trusts what this machine trusts (a proxy's CA included); the images keep
# Debian's own bundle.
if [ -f /etc/ssl/certs/ca-certificates.crt ]; then
  build_args+=(--volume /etc/ssl/certs/ca-certificates.crt:/etc/ssl/certs/ca-certificates.crt:ro)
fi
build() {  # build TARGET IMAGE [buildah bud flags...]: then checks the labels and the user
  build_stage "$@"
  "$PYTHON" tools/imagecheck.py labels "${2%:*}" "$VERSION" < <(bh inspect --type image "$2")
}
build_stage() {  # build_stage STAGE IMAGE [buildah bud flags...]
  local target=$1 image=$2; shift 2
  echo "buildah bud --target $target -t $image"
  bh bud "${build_args[@]}" "$@" --target "$target" -t "$image" "$context" > "$scratch/build-$target.log" 2>&1 \
    || { tail -40 "$scratch/build-$target.log" >&2; echo "build of $target failed" >&2; exit 1; }
}

# confined CONTAINER [--volume HOST:PATH]... [--entrypoint PROGRAM] [--user UID:GID] -- ARGS...:
# the container's entrypoint (or PROGRAM) with ARGS, its image's environment and user (or
# UID:GID), as the manifests run it: a mount and PID namespace of its own, the root filesystem
# read-only, a fresh tmpfs on /tmp, the volumes given, every capability dropped, no_new_privs.
# The network is the host's, so a loopback port answers from here. Runs in a subshell, which
# becomes the `unshare` process.
confined() (
  ctr=$1; shift
  volumes=() entrypoint=()
  mapfile -t entrypoint < <(bh inspect --type container --format '{{range .OCIv1.Config.Entrypoint}}{{println .}}{{end}}' "$ctr")
  user=$(bh inspect --type container --format '{{.OCIv1.Config.User}}' "$ctr")
  while [ "$1" != -- ]; do
    case $1 in
      --volume) volumes+=("$2") ;;
      --entrypoint) entrypoint=("$2") ;;
      --user) user=$2 ;;
      *) echo "confined: unknown option $1" >&2; exit 2 ;;
    esac
    shift 2
  done
  shift
  mapfile -t env < <(bh inspect --type container --format '{{range .OCIv1.Config.Env}}{{println .}}{{end}}' "$ctr")
  root=$(bh mount "$ctr")
  exec unshare --mount --propagation private --pid --fork -- bash -euc '
    root=$1 user=$2 volumes=$3; shift 3
    for volume in $volumes; do mkdir -p "$root${volume#*:}"; done  # mount points, as a runtime makes them
    mount --bind "$root" "$root"
    mount -o remount,bind,ro "$root"
    mount -t tmpfs -o mode=1777,size=512m tmpfs "$root/tmp"
    for volume in $volumes; do mount --bind "${volume%%:*}" "$root${volume#*:}"; done
    mount -t proc -o nosuid,nodev,noexec proc "$root/proc"
    mount -t tmpfs -o mode=755,size=64k tmpfs "$root/dev"
    for device in null zero full random urandom tty; do
      touch "$root/dev/$device"; mount --bind "/dev/$device" "$root/dev/$device"
    done
    mkdir "$root/dev/shm"; mount -t tmpfs -o mode=1777,size=64m tmpfs "$root/dev/shm"
    exec chroot "$root" setpriv --reuid="${user%%:*}" --regid="${user#*:}" --clear-groups \
      --no-new-privs --inh-caps=-all --bounding-set=-all -- "$@"
  ' confined "$root" "$user" "${volumes[*]}" env -i "${env[@]}" "${entrypoint[@]}" "$@"
)

# namespace_init PID: the program that `confined`, started in the background as PID, runs: the
# child of its `unshare` (which ignores SIGTERM), the first process of its PID namespace.
namespace_init() {
  local process=$1
  while [ -n "$process" ] && [ "$(ps -o comm= -p "$process")" != unshare ]; do
    process=$(pgrep -P "$process" | head -1)
  done
  [ -z "$process" ] || pgrep -P "$process"
}

# stop PID: SIGTERM to that program, as the kubelet sends it, then its exit status. It is PID 1
# of its namespace, as in a pod: only a signal it handles reaches it.
stop() {
  local pid=$1 status=0
  kill -TERM "$(namespace_init "$pid")"
  wait "$pid" || status=$?
  return $status
}

no_torch() {  # no_torch CONTAINER: `pip list` inside it names no torch, diffusers or transformers
  local listed
  listed=$(confined "$1" --entrypoint python -- -m pip list --format=freeze)
  if grep -iE '^(torch|diffusers|transformers)==' <<<"$listed"; then
    echo "the light images must not hold the packages above" >&2; exit 1
  fi
  echo "pip list: $(wc -l <<<"$listed") packages, no torch, diffusers or transformers"
}

phase "build scaler, exporter, gateway"
declare -A images usage
while read -r target image entrypoint; do
  images[$target]=$image:$VERSION usage[$target]="usage: $entrypoint"
done < <("$PYTHON" tools/imagecheck.py targets)
for target in scaler exporter gateway; do build "$target" "${images[$target]}"; done

phase "run scaler, exporter, gateway"
ctr=$(container "${images[scaler]}")
no_torch "$ctr"
grpc_port=$("$PYTHON" tools/imagecheck.py free-port)
http_port=$("$PYTHON" tools/imagecheck.py free-port)
confined "$ctr" -- --listen-address 127.0.0.1 --grpc-port "$grpc_port" --http-port "$http_port" \
  --kubernetes-api off > "$scratch/scaler.log" 2>&1 &
pids+=($!); scaler=$!
"$PYTHON" tools/imagecheck.py grpc-health "127.0.0.1:$grpc_port" --timeout 60 || { cat "$scratch/scaler.log" >&2; exit 1; }
"$PYTHON" tools/imagecheck.py get "http://127.0.0.1:$http_port/healthz" || { cat "$scratch/scaler.log" >&2; exit 1; }
stop "$scaler" || { cat "$scratch/scaler.log" >&2; echo "the scaler did not exit 0 on SIGTERM" >&2; exit 1; }
echo "scaler: exit 0 on SIGTERM"
for target in exporter gateway; do
  ctr=$(container "${images[$target]}")
  no_torch "$ctr"
  help=$(confined "$ctr" -- --help)
  [[ $help == "${usage[$target]}"* ]] || { echo "$target --help printed: $help" >&2; exit 1; }
  echo "$target: --help, $(wc -l <<<"$help") lines from ${usage[$target]}"
done

phase "build worker (TORCH_VARIANT=cpu)"
wheel_dirs=${TORCH_WHEEL_DIR:-"${PIP_FIND_LINKS:-} $("$PYTHON" -m pip config list 2>/dev/null | sed -n "s/^.*find-links='\(.*\)'$/\1/p")"}
wheel=
for dir in $wheel_dirs; do
  for found in "$dir"/torch-"$TORCH_VERSION"+cpu-cp311-cp311-*x86_64.whl; do [ -f "$found" ] && wheel=$found && break 2; done
done
worker_args=(--build-arg TORCH_VARIANT=cpu)
if [ -n "$wheel" ]; then
  mkdir -p "$scratch/torch-wheels"
  ln "$wheel" "$scratch/torch-wheels/" 2>/dev/null || cp "$wheel" "$scratch/torch-wheels/"
  worker_args+=(--build-context "torch-wheels=$scratch/torch-wheels")
  echo "torch from $wheel"
else
  echo "no torch-$TORCH_VERSION+cpu wheel for cp311 in: $wheel_dirs; the build downloads it from PyTorch's CPU index"
fi
build worker "${images[worker]}" "${worker_args[@]}"

phase "run worker (tiny model, one request)"
ctr=$(container "${images[worker]}")
models=$scratch/models
worker_user=$(bh inspect --type container --format '{{.OCIv1.Config.User}}' "$ctr")
install -d -o "${worker_user%%:*}" -g "${worker_user#*:}" "$models"  # as an emptyDir is: writable by the pod's user
confined "$ctr" --volume "$models:/models" -- make-model /models/tiny --arch tiny > "$scratch/make-model.log" 2>&1 \
  || { cat "$scratch/make-model.log" >&2; exit 1; }
echo "make-model: /models/tiny, $(du -sh "$models/tiny" | cut -f1)"
worker_port=$("$PYTHON" tools/imagecheck.py free-port)
confined "$ctr" --volume "$models:/models" -- serve --model /models/tiny --host 127.0.0.1 \
  --port "$worker_port" --device cpu > "$scratch/worker.log" 2>&1 &
pids+=($!); worker=$!
"$PYTHON" tools/imagecheck.py generate "http://127.0.0.1:$worker_port" --timeout 300 \
  || { cat "$scratch/worker.log" >&2; exit 1; }
stop "$worker" || { cat "$scratch/worker.log" >&2; echo "the worker did not exit 0 on SIGTERM" >&2; exit 1; }
echo "worker: exit 0 on SIGTERM"

phase "cuda worker's compiler stage"
# The cuda variant's own lines, short of its torch: gcc and Python's headers, usable by the
# worker's user on the read-only root, as Triton uses them when torch.compile runs a kernel.
build_stage worker-runtime-cuda localhost/diffusion-autoscaler-worker-runtime-cuda:check
ctr=$(container localhost/diffusion-autoscaler-worker-runtime-cuda:check)
confined "$ctr" --user "$worker_user" --volume "$PWD/tools:/check" --entrypoint python3 -- /check/imagecheck.py compile-extension

phase "clean up"
# Images of earlier runs, now untagged, the builds' leftovers and the check's stage; the base
# and the four images just built stay.
bh rm --all >/dev/null
bh rmi localhost/diffusion-autoscaler-worker-runtime-cuda:check >/dev/null
bh rmi --prune >/dev/null
bh images
echo "storage: $(du -sh "$CACHE_DIR" | cut -f1) in $CACHE_DIR; push with: buildah ${STORAGE[*]} push IMAGE docker://REGISTRY/IMAGE"
