"""The manifests run the images the Dockerfile builds, the way the images are made to run: every
image is a Dockerfile target at the project's version, every container is non-root (but one,
said why) on a read-only root filesystem with no capabilities, and every path an image writes
is a volume. `make image-test` (tools/image-test.sh) builds and runs the images themselves."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import tomllib

import pytest
import yaml

from tests.manifests.test_manifests import KUSTOMIZATIONS, MANIFESTS, ROOT, build, require

_spec = importlib.util.spec_from_file_location("imagecheck", ROOT / "tools" / "imagecheck.py")
imagecheck = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = imagecheck  # dataclasses look their module up there
_spec.loader.exec_module(imagecheck)

VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
TARGETS = imagecheck.deployables()
# Images of others that a kustomization may run, each with why.
THIRD_PARTY = {"redis:7.0": "overlays/queue-with-redis: a throwaway Redis to try the queue"}
# Environment variables of the images that name where a program writes.
WRITTEN_BY_THE_IMAGE = ("HOME", "TMPDIR", "XDG_CACHE_HOME", "HF_HOME")
# ...and of the manifests.
WRITTEN_BY_THE_PROGRAM = ("WORKER_COMPILE_CACHE_DIR",)
# The one container that is root: connecting to the kubelet's PodResources socket takes its owner.
ROOT_CONTAINERS = {("DaemonSet", "gpu-exporter", "exporter"): "/var/lib/kubelet/pod-resources"}


def pod_templates(kustomization: str) -> list[tuple[str, str, dict]]:
    """(kind, name, pod spec) of every workload the kustomization builds."""
    return [(o["kind"], o["metadata"]["name"], o["spec"]["template"]["spec"]) for o in build(kustomization)
            if o["kind"] in ("Deployment", "DaemonSet", "StatefulSet", "Job")]


def containers(pod: dict) -> list[dict]:
    return pod.get("initContainers", []) + pod["containers"]


def everywhere() -> list[tuple[str, str, str, dict, dict]]:
    """(kustomization, kind, workload, pod spec, container) for every container of every kustomization."""
    return [(k, kind, name, pod, c) for k in KUSTOMIZATIONS for kind, name, pod in pod_templates(k)
            for c in containers(pod)]


def target_of(image: str) -> imagecheck.Stage | None:
    name, _, tag = image.rpartition(":")
    return next((stage for stage in TARGETS.values() if stage.image_name == name and tag == VERSION), None)


def test_the_dockerfile_has_one_target_per_deployable_and_no_torch_in_the_light_ones():
    assert set(TARGETS) == {"scaler", "exporter", "gateway", "worker"}
    stages = imagecheck.dockerfile_stages()
    for name in ("scaler", "exporter", "gateway"):
        assert stages[name].base == "light"
    assert stages["light"].base == "runtime"  # not from the worker's stages
    assert [s.entrypoint for s in TARGETS.values()] == [["python", "-m", m] for m in ("adapter", "exporter", "gateway", "worker")]


def test_every_image_in_every_kustomization_is_a_dockerfile_target_at_the_project_version():
    used = set()
    for kustomization, kind, workload, _, c in everywhere():
        if c["image"] in THIRD_PARTY:
            continue
        stage = target_of(c["image"])
        assert stage is not None, (f"{kustomization}: {kind}/{workload} container {c['name']} runs {c['image']}, "
                                   f"not one of {sorted(f'{s.image_name}:{VERSION}' for s in TARGETS.values())}")
        used.add(stage.name)
    assert used == set(TARGETS), f"targets no manifest runs: {set(TARGETS) - used}"


def test_a_command_runs_the_program_of_its_image():
    for kustomization, kind, workload, _, c in everywhere():
        stage = target_of(c["image"])
        if stage is None or "command" not in c:
            continue  # the image's entrypoint runs
        program = " ".join(stage.entrypoint)
        assert program in " ".join(c["command"]), f"{kustomization}: {kind}/{workload} {c['name']} does not run {program}"


def test_every_container_runs_without_root_capabilities_or_a_writable_root_filesystem():
    checked = 0
    for kustomization, kind, workload, pod, c in everywhere():
        where = f"{kustomization}: {kind}/{workload} container {c['name']}"
        effective = {**pod.get("securityContext", {}), **c.get("securityContext", {})}
        container_level = c.get("securityContext", {})
        assert container_level.get("allowPrivilegeEscalation") is False, where
        assert container_level.get("readOnlyRootFilesystem") is True, where
        assert container_level.get("capabilities") == {"drop": ["ALL"]}, where
        assert effective.get("seccompProfile") == {"type": "RuntimeDefault"}, where
        assert "privileged" not in effective, where
        root_mount = ROOT_CONTAINERS.get((kind, workload, c["name"]))
        if root_mount is not None:
            assert effective["runAsUser"] == 0 and effective["runAsNonRoot"] is False, where
            assert root_mount in {m["mountPath"] for m in c["volumeMounts"]}, f"{where} is root for nothing"
            continue
        assert effective.get("runAsNonRoot") is True, where
        stage = target_of(c["image"])
        if stage is not None:
            # The image's own user, so that files it made (and runAsNonRoot's check) agree.
            uid, gid = stage.user.split(":")
            assert (effective.get("runAsUser"), effective.get("runAsGroup")) == (int(uid), int(gid)), where
        checked += 1
    assert checked >= 8


def test_every_path_an_image_writes_is_a_writable_volume():
    for kustomization, kind, workload, pod, c in everywhere():
        stage = target_of(c["image"])
        if stage is None:
            continue
        written = {stage.env[name] for name in WRITTEN_BY_THE_IMAGE if name in stage.env}
        written |= {e["value"] for e in c.get("env", []) if e["name"] in WRITTEN_BY_THE_PROGRAM}
        assert "/tmp" in written
        mounts = [m["mountPath"] for m in c.get("volumeMounts", []) if not m.get("readOnly")]
        for path in written:
            assert any(path == m or path.startswith(m.rstrip("/") + "/") for m in mounts), (
                f"{kustomization}: {kind}/{workload} container {c['name']} writes {path}, which no volume holds")
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        for mount in c.get("volumeMounts", []):
            # hostPath is root's: the kubelet makes it root-owned, and the images' user could not write it.
            assert "hostPath" not in volumes[mount["name"]] or (kind, workload, c["name"]) in ROOT_CONTAINERS, mount


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_an_images_override_in_an_overlay_moves_every_image_to_a_registry(kustomization, tmp_path):
    """README's recipe: an overlay of one's own with `images:` naming each target."""
    kubectl = require("kubectl")
    registry = "registry.example.com/ml"
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": [os.path.relpath(MANIFESTS / kustomization, tmp_path)],
        "images": [{"name": s.image_name, "newName": f"{registry}/{s.image_name}"} for s in TARGETS.values()],
    }))
    result = subprocess.run([kubectl, "kustomize", str(tmp_path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    moved = {c["image"] for o in yaml.safe_load_all(result.stdout) if o and o["kind"] in ("Deployment", "DaemonSet")
             for c in containers(o["spec"]["template"]["spec"])}
    shipped = {c["image"] for _, _, pod in pod_templates(kustomization) for c in containers(pod)}
    assert moved == {image if image in THIRD_PARTY else f"{registry}/{image}" for image in shipped}
