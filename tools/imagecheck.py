"""The checks `make image-test` (tools/image-test.sh) runs on the images, and the Dockerfile's
targets as data.

    python tools/imagecheck.py targets                      one line per deployable: stage image entrypoint
    python tools/imagecheck.py labels NAME VERSION < JSON   `buildah inspect --type image` output
    python tools/imagecheck.py free-port                    a free TCP port on 127.0.0.1
    python tools/imagecheck.py get URL                      HTTP 200, or exit 1
    python tools/imagecheck.py grpc-health HOST:PORT        waits for SERVING (the scaler)
    python tools/imagecheck.py generate URL                 waits for /readyz, then one image (the worker)
    python imagecheck.py compile-extension                  inside an image: build and import a C extension

A failed check exits 1 with one line that says what was expected and what was found.
tests/manifests/test_images.py reads the targets through `dockerfile_stages` as well, so the
manifests, the Dockerfile and the test script cannot name different images.
"""

from __future__ import annotations

import argparse
import base64
import importlib.util
import json
import shlex
import socket
import struct
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
# What every image carries (the OCI annotation keys, as labels).
REQUIRED_LABELS = ("title", "description", "source", "version", "licenses", "revision")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@dataclass
class Stage:
    """One `FROM ... AS name` stage, with what it inherits from the stage it starts from."""

    name: str
    base: str
    env: dict[str, str] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)
    user: str | None = None
    entrypoint: list[str] | None = None

    @property
    def image_name(self) -> str | None:
        """The image a deployable target is tagged as: its `org.opencontainers.image.title`."""
        return self.labels.get("org.opencontainers.image.title")


def _instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments dropped."""
    instructions, pending = [], ""
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("#") or not stripped:
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        whole = pending + stripped
        pending = ""
        keyword, _, arguments = whole.partition(" ")
        instructions.append((keyword.upper(), arguments.strip()))
    return instructions


def _pairs(arguments: str) -> dict[str, str]:
    """`KEY=VALUE ...` as LABEL and ENV write them (quotes removed)."""
    pairs = {}
    for token in shlex.split(arguments):
        key, equals, value = token.partition("=")
        if not equals:
            raise ValueError(f"expected KEY=VALUE, got {token!r} in {arguments!r}")
        pairs[key] = value
    return pairs


def dockerfile_stages(path: Path = DOCKERFILE) -> dict[str, Stage]:
    """Every stage of the Dockerfile by name, each with the environment, labels, user and
    entrypoint it ends with (inherited from the stage it starts `FROM`, as a build does). A
    global ARG in a FROM line takes its default (TORCH_VARIANT: cuda)."""
    stages: dict[str, Stage] = {}
    global_args: dict[str, str] = {}  # ARGs before the first FROM, with their defaults
    current: Stage | None = None
    for keyword, arguments in _instructions(path.read_text()):
        if keyword == "ARG" and current is None:
            name, _, default = arguments.partition("=")
            global_args[name] = default
        elif keyword == "FROM":
            for name, default in global_args.items():
                arguments = arguments.replace(f"${{{name}}}", default)
            words = arguments.split()
            if len(words) != 3 or words[1].upper() != "AS":
                raise ValueError(f"{path}: every stage needs a name (FROM image AS name), got FROM {arguments}")
            base, name = words[0], words[2]
            parent = stages.get(base)
            current = Stage(name, base)
            if parent is not None:
                current.env, current.labels = dict(parent.env), dict(parent.labels)
                current.user, current.entrypoint = parent.user, parent.entrypoint
            stages[name] = current
        elif current is None:
            continue
        elif keyword == "ENV":
            current.env.update(_pairs(arguments))
        elif keyword == "LABEL":
            current.labels.update(_pairs(arguments))
        elif keyword == "USER":
            current.user = arguments
        elif keyword == "ENTRYPOINT":
            current.entrypoint = json.loads(arguments)
    return stages


def deployables(path: Path = DOCKERFILE) -> dict[str, Stage]:
    """The targets that are images to run: the stages with an entrypoint of their own name's image."""
    found = {}
    for name, stage in dockerfile_stages(path).items():
        if stage.entrypoint is None or stage.image_name is None:
            continue
        if stage.image_name != f"diffusion-autoscaler-{name}":
            raise ValueError(f"{path}: target {name} is titled {stage.image_name}, not diffusion-autoscaler-{name}")
        found[name] = stage
    return found


def check_labels(config: dict, image_name: str, version: str) -> list[str]:
    """What is wrong with an image's labels and user, from `buildah inspect --type image`; [] if nothing."""
    oci = config["OCIv1"]["config"]
    labels = oci.get("Labels") or {}
    problems = [f"label org.opencontainers.image.{key} is missing or empty" for key in REQUIRED_LABELS
                if not labels.get(f"org.opencontainers.image.{key}")]
    if labels.get("org.opencontainers.image.title") != image_name:
        problems.append(f"title is {labels.get('org.opencontainers.image.title')!r}, the image is {image_name!r}")
    if labels.get("org.opencontainers.image.version") != version:
        problems.append(f"version label is {labels.get('org.opencontainers.image.version')!r}, pyproject says {version!r}")
    user = oci.get("User", "")
    uid = user.split(":")[0]
    # runAsNonRoot can only be verified by the kubelet against a numeric, non-zero UID.
    if not uid.isdigit() or int(uid) == 0:
        problems.append(f"user is {user!r}, expected a numeric non-root UID")
    return problems


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_serving(address: str, timeout_s: float) -> str:
    """Polls the gRPC health service (overall and the ExternalScaler) until both answer SERVING.
    Returns a line to print; raises TimeoutError naming the last answer or error."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + timeout_s
    last = "no answer"
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            try:
                statuses = {service: stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=2).status
                            for service in ("", "externalscaler.ExternalScaler")}
                if all(s == health_pb2.HealthCheckResponse.SERVING for s in statuses.values()):
                    return f"grpc health at {address}: SERVING (overall and externalscaler.ExternalScaler)"
                last = str({k or "overall": health_pb2.HealthCheckResponse.ServingStatus.Name(v)
                            for k, v in statuses.items()})
            except grpc.RpcError as error:
                last = f"{error.code().name}: {error.details()}"
            time.sleep(0.5)
    raise TimeoutError(f"grpc health at {address} not SERVING after {timeout_s:.0f} s; last: {last}")


def png_size(data: bytes) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk; ValueError if `data` is not a PNG."""
    if data[:8] != PNG_SIGNATURE or data[12:16] != b"IHDR":
        raise ValueError(f"not a PNG: starts with {data[:16]!r}")
    return struct.unpack(">II", data[16:24])


def generate_one(url: str, timeout_s: float, size: str) -> str:
    """Waits for the worker's /readyz, posts one generation request of `size` and checks the answer
    is one PNG of that size. Returns a line to print; raises on any other outcome."""
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    while True:
        try:
            with urllib.request.urlopen(f"{url}/readyz", timeout=5) as response:
                if response.status == 200:
                    break
        except urllib.error.HTTPError as error:
            last = f"HTTP {error.code}"
        except OSError as error:
            last = str(error)
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url}/readyz not 200 after {timeout_s:.0f} s; last: {last}")
        time.sleep(1)
    request = urllib.request.Request(
        f"{url}/v1/images/generations", method="POST", headers={"content-type": "application/json"},
        data=json.dumps({"prompt": "a lighthouse at dusk", "n": 1, "seed": 7, "size": size,
                         "num_inference_steps": 2}).encode())
    started = time.monotonic()
    with urllib.request.urlopen(request, timeout=max(deadline - time.monotonic(), 30)) as response:
        body = json.loads(response.read())
    seconds = time.monotonic() - started
    [image] = body["data"]
    width, height = png_size(base64.b64decode(image["b64_json"]))
    if f"{width}x{height}" != size:
        raise ValueError(f"asked for {size}, got a {width}x{height} PNG")
    return f"POST {url}/v1/images/generations: one {width}x{height} PNG (seed {image['seed']}) in {seconds:.2f} s"


EXTENSION_SOURCE = """\
#include <Python.h>
static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "probe", "built at run time", -1, NULL};
PyMODINIT_FUNC PyInit_probe(void) { return PyModule_Create(&module); }
"""


def compile_extension() -> str:
    """Builds a C extension module against this interpreter's headers in a temporary directory,
    with `cc`, and imports it: what Triton does for its launcher when torch.compile first runs a
    kernel. Returns a line to print; raises OSError or subprocess.CalledProcessError."""
    with tempfile.TemporaryDirectory() as directory:
        source = Path(directory, "probe.c")
        source.write_text(EXTENSION_SOURCE)
        library = Path(directory, "probe" + sysconfig.get_config_var("EXT_SUFFIX"))
        include = sysconfig.get_paths()["include"]
        subprocess.run(["cc", "-shared", "-fPIC", "-O1", f"-I{include}", str(source), "-o", str(library)],
                       check=True, capture_output=True, text=True)
        spec = importlib.util.spec_from_file_location("probe", library)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return f"built and imported a C extension against {include} in {directory}: {module.__doc__}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python tools/imagecheck.py", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("targets", help="the Dockerfile's deployable targets: stage image-name")
    labels = commands.add_parser("labels", help="check `buildah inspect --type image` JSON on stdin")
    labels.add_argument("image_name")
    labels.add_argument("version")
    commands.add_parser("free-port", help="a free TCP port on 127.0.0.1")
    get = commands.add_parser("get", help="GET URL, which must answer 200")
    get.add_argument("url")
    health = commands.add_parser("grpc-health", help="wait until the scaler's gRPC health says SERVING")
    health.add_argument("address", help="HOST:PORT")
    health.add_argument("--timeout", type=float, default=60.0, help="seconds")
    generate = commands.add_parser("generate", help="wait for the worker's /readyz, then generate one image")
    generate.add_argument("url", help="http://HOST:PORT")
    generate.add_argument("--timeout", type=float, default=300.0, help="seconds")
    generate.add_argument("--size", default="64x64", help="WIDTHxHEIGHT asked for and expected")
    commands.add_parser("compile-extension", help="build and import a C extension, as Triton does")
    args = parser.parse_args(argv)
    try:
        if args.command == "targets":
            for name, stage in deployables().items():
                print(name, stage.image_name, shlex.join(stage.entrypoint))
        elif args.command == "labels":
            problems = check_labels(json.load(sys.stdin), args.image_name, args.version)
            if problems:
                raise ValueError(f"{args.image_name}: " + "; ".join(problems))
            print(f"{args.image_name}: labels and user as expected")
        elif args.command == "free-port":
            print(free_port())
        elif args.command == "get":
            with urllib.request.urlopen(args.url, timeout=10) as response:
                print(f"GET {args.url}: {response.status}")
        elif args.command == "grpc-health":
            print(wait_for_serving(args.address, args.timeout))
        elif args.command == "generate":
            print(generate_one(args.url, args.timeout, args.size))
        elif args.command == "compile-extension":
            print(compile_extension())
    except subprocess.CalledProcessError as error:
        print(f"imagecheck {args.command}: {shlex.join(error.cmd)} failed: {error.stderr}", file=sys.stderr)
        return 1
    except (ValueError, TimeoutError, OSError, KeyError) as error:
        print(f"imagecheck {args.command}: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
