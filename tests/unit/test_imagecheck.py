"""tools/imagecheck.py: the Dockerfile read as data, and the checks `make image-test` runs."""

from __future__ import annotations

import importlib.util
import shutil
import struct
import sys
import zlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("imagecheck", ROOT / "tools" / "imagecheck.py")
imagecheck = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = imagecheck  # dataclasses look their module up there
_spec.loader.exec_module(imagecheck)

DOCKERFILE = """\
# syntax=docker/dockerfile:1
ARG BASE_IMAGE=debian:bookworm
ARG FLAVOUR=plain
FROM ${BASE_IMAGE} AS runtime
ENV HOME=/tmp \\
    PATH=/opt/venv/bin:${PATH}
LABEL org.opencontainers.image.licenses="Apache-2.0"

FROM runtime AS tools-plain
FROM runtime AS tools-fancy
ENV FANCY=1

FROM tools-${FLAVOUR} AS app
# a comment between instructions
LABEL org.opencontainers.image.title="diffusion-autoscaler-app" \\
      org.opencontainers.image.description="An app"
USER 10001:10001
ENTRYPOINT ["python", "-m", "app"]

FROM app AS helper
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "Dockerfile"
    path.write_text(text)
    return path


def test_a_stage_inherits_environment_labels_user_and_entrypoint_from_the_stage_it_starts_from(tmp_path):
    stages = imagecheck.dockerfile_stages(write(tmp_path, DOCKERFILE))
    assert list(stages) == ["runtime", "tools-plain", "tools-fancy", "app", "helper"]
    assert stages["runtime"].base == "debian:bookworm"
    app = stages["app"]
    assert app.base == "tools-plain"  # the global ARG's default
    assert app.env == {"HOME": "/tmp", "PATH": "/opt/venv/bin:${PATH}"}  # not tools-fancy's FANCY
    assert app.labels["org.opencontainers.image.licenses"] == "Apache-2.0"
    assert app.image_name == "diffusion-autoscaler-app"
    assert (app.user, app.entrypoint) == ("10001:10001", ["python", "-m", "app"])
    assert stages["helper"].entrypoint == ["python", "-m", "app"]


def test_a_deployable_is_a_stage_with_an_entrypoint_titled_after_it(tmp_path):
    path = write(tmp_path, DOCKERFILE.replace("FROM app AS helper\n", ""))
    assert list(imagecheck.deployables(path)) == ["app"]
    # a stage inheriting another's title is not a second image of the same name
    with pytest.raises(ValueError, match="target helper is titled diffusion-autoscaler-app"):
        imagecheck.deployables(write(tmp_path, DOCKERFILE))


def test_a_stage_without_a_name_is_refused(tmp_path):
    with pytest.raises(ValueError, match="every stage needs a name"):
        imagecheck.dockerfile_stages(write(tmp_path, "FROM debian:bookworm\nUSER 1\n"))


def inspected(labels: dict[str, str], user: str) -> dict:
    return {"OCIv1": {"config": {"Labels": labels, "User": user}}}


GOOD_LABELS = {f"org.opencontainers.image.{key}": "x" for key in imagecheck.REQUIRED_LABELS} | {
    "org.opencontainers.image.title": "diffusion-autoscaler-scaler",
    "org.opencontainers.image.version": "0.1.0",
}


@pytest.mark.parametrize(("labels", "user", "problem"), [
    (GOOD_LABELS, "10001:10001", None),
    ({k: v for k, v in GOOD_LABELS.items() if not k.endswith("revision")}, "10001:10001", "revision is missing"),
    (GOOD_LABELS | {"org.opencontainers.image.source": ""}, "10001:10001", "source is missing or empty"),
    (GOOD_LABELS | {"org.opencontainers.image.title": "diffusion-autoscaler-worker"}, "10001:10001", "title is"),
    (GOOD_LABELS | {"org.opencontainers.image.version": "0.2.0"}, "10001:10001", "version label is '0.2.0'"),
    (GOOD_LABELS, "", "expected a numeric non-root UID"),
    (GOOD_LABELS, "0:0", "expected a numeric non-root UID"),
    (GOOD_LABELS, "diffusion", "expected a numeric non-root UID"),
])
def test_labels_and_user_are_checked(labels, user, problem):
    problems = imagecheck.check_labels(inspected(labels, user), "diffusion-autoscaler-scaler", "0.1.0")
    if problem is None:
        assert problems == []
    else:
        assert any(problem in p for p in problems), problems


def png(width: int, height: int) -> bytes:
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return imagecheck.PNG_SIGNATURE + struct.pack(">I", 13) + b"IHDR" + header + struct.pack(">I", zlib.crc32(b"IHDR" + header))


def test_a_pngs_size_comes_from_its_header_and_anything_else_is_refused():
    assert imagecheck.png_size(png(64, 48)) == (64, 48)
    with pytest.raises(ValueError, match="not a PNG"):
        imagecheck.png_size(b"GIF89a" + bytes(20))


def test_the_repositorys_dockerfile_names_its_four_images_after_their_targets():
    assert {name: stage.image_name for name, stage in imagecheck.deployables().items()} == {
        name: f"diffusion-autoscaler-{name}" for name in ("scaler", "exporter", "gateway", "worker")}


def test_a_c_extension_builds_against_this_interpreters_headers_and_imports():
    """What the CUDA worker image must allow, as Triton's launcher needs (image-test runs it there)."""
    if shutil.which("cc") is None:
        pytest.skip("no C compiler here")
    assert "built at run time" in imagecheck.compile_extension()
