"""The Kubernetes manifests as the tests see them: kustomize builds, lookups into objects, shared checks."""

from __future__ import annotations

import functools
import posixpath
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from exporter.config import Config, load_config

ROOT = Path(__file__).resolve().parent.parent
KUSTOMIZE = ROOT / "deploy" / "kubernetes"
TARGETS = {
    "base": KUSTOMIZE / "base",
    "udp": KUSTOMIZE / "overlays" / "udp",
    "prometheus-operator": KUSTOMIZE / "overlays" / "prometheus-operator",
}
# Native sidecars (init containers with restartPolicy: Always) are on by default from 1.29 and GA in 1.33.
KUBERNETES_VERSIONS = ("1.29", "1.31", "1.33", "1.34", "1.35")
CONFIG_MOUNT_KEY = "config.yaml"
EXPORTER = "zenmux-exporter"
APP = "app"
# What the app may take to stop after SIGTERM before the exporter's drain begins (see deployment.yaml).
APP_SHUTDOWN_SECONDS = 10
CRDS = {("monitoring.coreos.com/v1", "PodMonitor")}

Obj = dict[str, Any]


@functools.cache
def kustomize(directory: Path) -> tuple[Obj, ...]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed (kubectl kustomize builds the manifests)")
    result = subprocess.run(
        [kubectl, "kustomize", str(directory)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    return tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc)


def build(target: str) -> tuple[Obj, ...]:
    return kustomize(TARGETS[target])


def only(objects: tuple[Obj, ...], kind: str) -> Obj:
    found = [o for o in objects if o["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]


def pod_spec(objects: tuple[Obj, ...]) -> Obj:
    spec: Obj = only(objects, "Deployment")["spec"]["template"]["spec"]
    return spec


def container(spec: Obj, name: str) -> Obj:
    for c in spec.get("initContainers", []) + spec.get("containers", []):
        if c["name"] == name:
            return dict(c)
    raise AssertionError(f"no container {name}")


def volume(spec: Obj, name: str) -> Obj:
    matches = [v for v in spec["volumes"] if v["name"] == name]
    assert len(matches) == 1, f"volume {name}: {matches}"
    return dict(matches[0])


def locate(c: Obj, path: str) -> tuple[Obj, str]:
    """The volumeMount holding path in container c (the deepest one), and path relative to it."""
    best: tuple[Obj, str] | None = None
    for mount in c.get("volumeMounts", []):
        root = mount["mountPath"].rstrip("/")
        if path.startswith(root + "/") and (best is None or len(root) > len(best[0]["mountPath"].rstrip("/"))):
            best = (mount, posixpath.relpath(path, root))
    assert best is not None, f"{path} is on no volume of container {c['name']} (the root fs is read-only)"
    return best


def exporter_config(objects: tuple[Obj, ...], tmp_path: Path) -> Config:
    cm = only(objects, "ConfigMap")
    path = tmp_path / CONFIG_MOUNT_KEY
    path.write_text(cm["data"][CONFIG_MOUNT_KEY], encoding="utf-8")
    return load_config(path, environ={}, check_system=False)  # the key file and addresses are the pod's


def port_of(c: Obj, port: int | str) -> int:
    if isinstance(port, int):
        return port
    named = [p["containerPort"] for p in c.get("ports", []) if p.get("name") == port]
    assert named, f"container {c['name']} has no port named {port}"
    return int(named[0])

def assert_strict(spec: Obj) -> None:
    """A pod spec as locked down as the base's: non-root, read-only root fs, no capabilities, memory bounded."""
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    assert spec.get("automountServiceAccountToken") is False
    assert not any(spec.get(k) for k in ("hostNetwork", "hostPID", "hostIPC"))
    for c in spec.get("initContainers", []) + spec["containers"]:
        sc = c["securityContext"]
        assert sc["runAsNonRoot"] is True and sc["runAsUser"] > 0, c["name"]
        assert sc["readOnlyRootFilesystem"] is True, c["name"]
        assert sc["allowPrivilegeEscalation"] is False, c["name"]
        assert sc["capabilities"]["drop"] == ["ALL"] and not sc["capabilities"].get("add"), c["name"]
        assert sc["seccompProfile"]["type"] == "RuntimeDefault", c["name"]
        assert c["resources"]["requests"]["memory"] and c["resources"]["limits"]["memory"], c["name"]


def dockerfile() -> str:
    return (ROOT / "Dockerfile").read_text(encoding="utf-8")
