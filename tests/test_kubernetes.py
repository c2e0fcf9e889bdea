"""Tests of deploy/kubernetes and the Dockerfile: overlays build, validate offline, agree with the config."""

from __future__ import annotations

import copy
import functools
import posixpath
import re
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import kubernetes_validate
import pytest
from zenmux_emit.emit import FileEmitter, UdpEmitter, open_emitter

from tests.kubernetes_manifests import (
    APP,
    APP_SHUTDOWN_SECONDS,
    CONFIG_MOUNT_KEY,
    CRDS,
    EXPORTER,
    KUBERNETES_VERSIONS,
    ROOT,
    TARGETS,
    assert_strict,
    build,
    container,
    dockerfile,
    exporter_config,
    locate,
    only,
    pod_spec,
    port_of,
    volume,
)


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
    probe_port = config.metrics.probe_listen.rpartition(":")[2] if config.metrics.probe_listen else port
    assert config.metrics.probe_listen.rpartition(":")[0] in ("0.0.0.0", ""), "the kubelet reaches the pod IP"
    for probe in probes.values():
        assert port_of(exporter, probe["port"]) == int(probe_port)
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
        assert source.format == "json"  # what zenmux_emit.emit's FileEmitter writes
    else:
        host, _, port = source.listen.rpartition(":")
        assert host == "127.0.0.1", "the UDP source stays on the pod's loopback"
        assert url.scheme == "udp" and url.hostname == host and url.port == int(port)
        assert ("format=json" in url.query) == (source.format == "json")
        assert all(m["mountPath"] != "/var/log/app" for m in app.get("volumeMounts", []))
    assert source.id_field == "generation_id"
    assert set(source.labels) <= set(config.metrics.extra_labels)
    emitter = open_emitter(emit_target)  # the target parses (the file's directory exists only in the pod)
    assert isinstance(emitter, FileEmitter) or (isinstance(emitter, UdpEmitter) and emitter.last_error == "")


def test_grace_period_covers_the_drain(target: str, tmp_path: Path) -> None:
    objects = build(target)
    config = exporter_config(objects, tmp_path)
    grace = pod_spec(objects)["terminationGracePeriodSeconds"]
    assert grace >= APP_SHUTDOWN_SECONDS + config.shutdown.drain_seconds + 5


def test_security_context_is_strict(target: str) -> None:
    assert_strict(pod_spec(build(target)))


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
