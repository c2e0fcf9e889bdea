"""Tests of deploy/kubernetes and the Dockerfile: overlays build, validate offline, agree with the config."""

from __future__ import annotations

import copy
import functools
import posixpath
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import kubernetes_validate
import pytest
import yaml

from exporter.config import Config, load_config
from exporter.emit import open_emitter

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
def build(target: str) -> tuple[Obj, ...]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed (kubectl kustomize builds the manifests)")
    result = subprocess.run(
        [kubectl, "kustomize", str(TARGETS[target])], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    return tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc)


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


@pytest.fixture(params=sorted(TARGETS))
def target(request: pytest.FixtureRequest) -> str:
    return str(request.param)


# -- build and schema validation ---------------------------------------------------------------------------


def test_every_overlay_builds(target: str) -> None:
    kinds = sorted(o["kind"] for o in build(target))
    expected = ["ConfigMap", "Deployment"] + (["PodMonitor"] if target == "prometheus-operator" else [])
    assert kinds == sorted(expected)


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_objects_validate_strictly(target: str, version: str) -> None:
    checked = 0
    for obj in build(target):
        if (obj["apiVersion"], obj["kind"]) in CRDS:
            continue
        kubernetes_validate.validate(obj, version, strict=True)
        checked += 1
    assert checked >= 2


def test_strict_validation_would_catch_a_typo() -> None:
    deployment = copy.deepcopy(only(build("base"), "Deployment"))
    container(deployment["spec"]["template"]["spec"], EXPORTER)  # exists
    deployment["spec"]["template"]["spec"]["initContainers"][0]["restartPolicyy"] = "Always"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSIONS[-1], strict=True)


def test_podmonitor_structure() -> None:
    objects = build("prometheus-operator")
    monitor = only(objects, "PodMonitor")
    deployment = only(objects, "Deployment")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", monitor["metadata"]["name"])
    assert set(monitor) <= {"apiVersion", "kind", "metadata", "spec"}
    spec = monitor["spec"]
    assert set(spec) <= {"selector", "podMetricsEndpoints", "namespaceSelector", "jobLabel", "podTargetLabels"}
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    selector = spec["selector"]["matchLabels"]
    assert selector and selector.items() <= pod_labels.items()
    exporter = container(deployment["spec"]["template"]["spec"], EXPORTER)
    endpoints = spec["podMetricsEndpoints"]
    assert isinstance(endpoints, list) and len(endpoints) == 1
    endpoint = endpoints[0]
    assert endpoint["path"] == "/metrics"
    port_of(exporter, endpoint["port"])  # a named port of the exporter container
    for key in ("interval", "scrapeTimeout"):
        assert re.fullmatch(r"\d+(ms|s|m|h)", endpoint[key])
    # With the operator, the annotations are gone (no double scrape).
    annotations = deployment["spec"]["template"]["metadata"].get("annotations") or {}
    assert not any(k.startswith("prometheus.io/") for k in annotations)


# -- consistency: the config, the Deployment and the app agree ----------------------------------------------


def test_configmap_passes_the_exporters_validation(target: str, tmp_path: Path) -> None:
    config = exporter_config(build(target), tmp_path)
    assert config.zenmux.api_key_file and not config.zenmux.api_key
    assert len(config.sources) == 1


def test_exporter_is_a_native_sidecar_reading_the_configmap(target: str) -> None:
    objects = build(target)
    spec = pod_spec(objects)
    exporter = container(spec, EXPORTER)
    assert exporter in spec["initContainers"] and exporter.get("restartPolicy") == "Always"
    args = exporter["args"]
    assert args[0] == "run" and "--config" in args
    config_path = args[args.index("--config") + 1]
    mount, relative = locate(exporter, config_path)
    assert mount.get("readOnly") is True and relative == CONFIG_MOUNT_KEY
    assert volume(spec, mount["name"])["configMap"]["name"] == only(objects, "ConfigMap")["metadata"]["name"]


def test_ports_probes_and_scrape_annotations_agree(target: str, tmp_path: Path) -> None:
    objects = build(target)
    config = exporter_config(objects, tmp_path)
    spec = pod_spec(objects)
    exporter = container(spec, EXPORTER)
    host, _, port = config.metrics.listen.rpartition(":")
    assert host in ("0.0.0.0", ""), "the kubelet and Prometheus reach the pod IP, not loopback"
    assert port_of(exporter, "metrics") == int(port)
    probes = {name: exporter[name]["httpGet"] for name in ("startupProbe", "readinessProbe", "livenessProbe")}
    assert probes["livenessProbe"]["path"] == "/healthz"
    assert probes["readinessProbe"]["path"] == probes["startupProbe"]["path"] == "/readyz"
    for probe in probes.values():
        assert port_of(exporter, probe["port"]) == int(port)
    annotations = only(objects, "Deployment")["spec"]["template"]["metadata"].get("annotations") or {}
    if target != "prometheus-operator":
        assert annotations["prometheus.io/scrape"] == "true"
        assert annotations["prometheus.io/port"] == port
        assert annotations["prometheus.io/path"] == "/metrics"


def test_files_of_the_config_are_on_the_right_volumes(target: str, tmp_path: Path) -> None:
    objects = build(target)
    config = exporter_config(objects, tmp_path)
    spec = pod_spec(objects)
    exporter = container(spec, EXPORTER)

    mount, relative = locate(exporter, config.zenmux.api_key_file)
    secret = volume(spec, mount["name"])["secret"]
    assert mount.get("readOnly") is True
    assert relative in [item["path"] for item in secret.get("items", [])] or "items" not in secret

    state_mount, _ = locate(exporter, config.state.path)
    assert not state_mount.get("readOnly"), "the state database needs a writable volume"
    assert "emptyDir" in volume(spec, state_mount["name"])
    assert posixpath.dirname(config.state.path) == "/var/lib/zenmux-exporter"  # the image's VOLUME


def test_the_app_writes_where_the_exporter_reads(target: str, tmp_path: Path) -> None:
    objects = build(target)
    config = exporter_config(objects, tmp_path)
    spec = pod_spec(objects)
    exporter, app = container(spec, EXPORTER), container(spec, APP)
    emit_target = {e["name"]: e.get("value", "") for e in app.get("env", [])}["ZENMUX_EMIT"]
    url = urlsplit(emit_target)
    (source,) = config.sources
    if source.type == "file":
        assert url.scheme == "file"
        exporter_mount, exporter_rel = locate(exporter, source.path)
        app_mount, app_rel = locate(app, url.path)
        assert exporter_mount["name"] == app_mount["name"] and exporter_rel == app_rel
        assert not app_mount.get("readOnly")
        assert "emptyDir" in volume(spec, app_mount["name"])
        assert source.format == "json"  # what exporter.emit's FileEmitter writes
    else:
        host, _, port = source.listen.rpartition(":")
        assert host == "127.0.0.1", "the UDP source stays on the pod's loopback"
        assert url.scheme == "udp" and url.hostname == host and url.port == int(port)
        assert ("format=json" in url.query) == (source.format == "json")
        assert all(m["mountPath"] != "/var/log/app" for m in app.get("volumeMounts", []))
    assert source.id_field == "generation_id"
    assert set(source.labels) <= set(config.metrics.extra_labels)
    assert open_emitter(emit_target).last_error == ""  # the target parses


def test_grace_period_covers_the_drain(target: str, tmp_path: Path) -> None:
    objects = build(target)
    config = exporter_config(objects, tmp_path)
    grace = pod_spec(objects)["terminationGracePeriodSeconds"]
    assert grace >= APP_SHUTDOWN_SECONDS + config.shutdown.drain_seconds + 5


def test_security_context_is_strict(target: str) -> None:
    spec = pod_spec(build(target))
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    assert spec.get("automountServiceAccountToken") is False
    assert not any(spec.get(k) for k in ("hostNetwork", "hostPID", "hostIPC"))
    for c in spec["initContainers"] + spec["containers"]:
        sc = c["securityContext"]
        assert sc["runAsNonRoot"] is True and sc["runAsUser"] > 0, c["name"]
        assert sc["readOnlyRootFilesystem"] is True, c["name"]
        assert sc["allowPrivilegeEscalation"] is False, c["name"]
        assert sc["capabilities"]["drop"] == ["ALL"] and not sc["capabilities"].get("add"), c["name"]
        assert sc["seccompProfile"]["type"] == "RuntimeDefault", c["name"]
        assert c["resources"]["requests"]["memory"] and c["resources"]["limits"]["memory"], c["name"]


def test_exporter_runs_as_the_images_user() -> None:
    exporter = container(pod_spec(build("base")), EXPORTER)
    user = re.search(r"^USER (\d+):(\d+)$", dockerfile(), re.MULTILINE)
    assert user is not None
    assert (exporter["securityContext"]["runAsUser"], exporter["securityContext"]["runAsGroup"]) == (
        int(user[1]),
        int(user[2]),
    )


# -- the Dockerfile (no engine here: checked as text) --------------------------------------------------------


@functools.cache
def dockerfile() -> str:
    return (ROOT / "Dockerfile").read_text(encoding="utf-8")


def stages() -> Iterator[tuple[str, str]]:
    """(FROM line, body) per stage."""
    parts = re.split(r"^(FROM .*)$", dockerfile(), flags=re.MULTILINE)
    for i in range(1, len(parts), 2):
        yield parts[i], parts[i + 1]


def test_dockerfile_shape() -> None:
    text = dockerfile()
    base = re.search(r"^ARG PYTHON_IMAGE=(\S+)$", text, re.MULTILINE)
    assert base is not None and re.fullmatch(r"python:\d+\.\d+\.\d+-slim-\w+(@sha256:[0-9a-f]{64})?", base[1])
    all_stages = list(stages())
    assert len(all_stages) >= 2, "multi-stage"
    final_from, final = all_stages[-1]
    assert "${PYTHON_IMAGE}" in final_from
    assert "pip install" not in final and "apt-get" not in final, "no building in the final stage"
    assert "COPY --from=build /opt/venv /opt/venv" in final
    assert re.search(r"pip uninstall --yes pip", final), "no installer left in the runtime"
    user = re.search(r"^USER (\d+):(\d+)$", final, re.MULTILINE)
    assert user is not None and int(user[1]) > 0
    assert 'VOLUME ["/var/lib/zenmux-exporter"]' in final
    assert 'ENTRYPOINT ["zenmux-exporter"]' in final
    assert "PYTHONDONTWRITEBYTECODE=1" in final
    for label in ("title", "description", "version", "revision", "created", "licenses", "source"):
        assert f"org.opencontainers.image.{label}=" in final
    assert "EXPOSE 9466/tcp 9467/udp" in final


def test_dockerignore_lets_only_the_package_in() -> None:
    lines = [line for line in (ROOT / ".dockerignore").read_text().splitlines() if line and not line.startswith("#")]
    assert lines[0] == "*"
    allowed = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    assert allowed == {"pyproject.toml", "README.md", "exporter"}
    copied = set(re.findall(r"^COPY (?!--from)(.+) \S+$", dockerfile(), re.MULTILINE))
    assert {src for line in copied for src in line.split()} <= allowed
