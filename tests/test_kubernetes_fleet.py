"""Tests of deploy/kubernetes/overlays/fleet: it builds, validates offline, and its three roles agree."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from exporter.config import Config, load_config
from exporter.pgurl import ssl_root_cert, url_problem
from tests.kubernetes_manifests import (
    APP,
    APP_SHUTDOWN_SECONDS,
    CONFIG_MOUNT_KEY,
    EXPORTER,
    KUBERNETES_VERSIONS,
    KUSTOMIZE,
    TARGETS,
    Obj,
    assert_strict,
    container,
    dockerfile,
    kustomize,
    locate,
    port_of,
    volume,
)

FLEET = KUSTOMIZE / "overlays" / "fleet"
APP_DEPLOYMENT = "example-app"
RESOLVER = "zenmux-resolver"
EXPOSER = "zenmux-exposer"
ROLE_OF = {APP_DEPLOYMENT: "ingest", RESOLVER: "resolve", EXPOSER: "expose"}
API_KEY_SECRET = "zenmux-api-key"
DB_SECRET = "zenmux-state-db"
# What a reference to the Secret's database URL stands for when the configs are loaded here: the URL the docs
# tell users to put in the Secret (verify-full, with the CA every role mounts).
PLACEHOLDER_URL = "postgresql://zenmux@postgres.example:5432/zenmux?sslmode=verify-full&sslrootcert=/etc/zenmux-db-ca/ca.crt"
CA_CONFIGMAP = "zenmux-state-db-ca"
DOCS = KUSTOMIZE.parent.parent / "docs"
METRICS_PORT = 9466
PROBE_PORT = 9468
# The base's drain waits out ZenMux's billing delay; the ingest sidecar's must not (nothing dies with the pod).
MAX_INGEST_DRAIN_SECONDS = 60
DEFAULT_DRAIN_SECONDS = 20.0  # shutdown.drain_seconds when a config leaves it out


def objects() -> tuple[Obj, ...]:
    return kustomize(FLEET)


def of_kind(kind: str) -> list[Obj]:
    return [o for o in objects() if o["kind"] == kind]


def deployment(name: str) -> Obj:
    (found,) = [d for d in of_kind("Deployment") if d["metadata"]["name"] == name]
    return found


def pod(name: str) -> Obj:
    spec: Obj = deployment(name)["spec"]["template"]["spec"]
    return spec


def exporter(name: str) -> Obj:
    return container(pod(name), EXPORTER)


def config_path(name: str) -> str:
    args = exporter(name)["args"]
    assert args[0] == "run" and "--config" in args
    return str(args[args.index("--config") + 1])


def config_text(name: str) -> str:
    """The config file the exporter of Deployment `name` reads, from the ConfigMap mounted where --config says."""
    mount, relative = locate(exporter(name), config_path(name))
    assert mount.get("readOnly") is True and relative == CONFIG_MOUNT_KEY
    configmap_name = volume(pod(name), mount["name"])["configMap"]["name"]
    (configmap,) = [c for c in of_kind("ConfigMap") if c["metadata"]["name"] == configmap_name]
    return str(configmap["data"][CONFIG_MOUNT_KEY])


def raw_config(name: str) -> dict[str, Any]:
    data = yaml.safe_load(config_text(name))
    assert isinstance(data, dict)
    return data


def environ(c: Obj) -> dict[str, str]:
    """The container's environment as the exporter would see it; Secret references become placeholders."""
    env: dict[str, str] = {}
    for var in c.get("env", []):
        ref = var.get("valueFrom", {}).get("secretKeyRef")
        env[var["name"]] = PLACEHOLDER_URL if ref is not None else var.get("value", "")
    return env


def secrets_reaching(name: str, c: Obj) -> set[str]:
    """Every Secret the container can read: mounted volumes, env references, envFrom."""
    spec = pod(name)
    names = {
        volume(spec, m["name"])["secret"]["secretName"]
        for m in c.get("volumeMounts", [])
        if "secret" in volume(spec, m["name"])
    }
    names |= {
        v["valueFrom"]["secretKeyRef"]["name"] for v in c.get("env", []) if "secretKeyRef" in v.get("valueFrom", {})
    }
    names |= {e["secretRef"]["name"] for e in c.get("envFrom", []) if "secretRef" in e}
    return names


def secret_file(name: str, path: str) -> tuple[str, str]:
    """(Secret name, key) of the file at `path` in the exporter of Deployment `name`; it must be mounted read-only."""
    mount, relative = locate(exporter(name), path)
    assert mount.get("readOnly") is True, f"{path} in {name}: the Secret is mounted writable"
    secret = volume(pod(name), mount["name"])["secret"]
    items = {item["path"]: item["key"] for item in secret.get("items", [])}
    return secret["secretName"], items.get(relative, relative)


def fleet_support() -> bool:
    return "roles" in {f.name for f in dataclasses.fields(Config)}


@pytest.fixture(params=sorted(ROLE_OF))
def name(request: pytest.FixtureRequest) -> str:
    return str(request.param)


# -- build and schema validation ---------------------------------------------------------------------------


def test_fleet_overlay_builds() -> None:
    assert sorted(o["kind"] for o in objects()) == sorted(
        ["ConfigMap"] * 3 + ["Deployment"] * 3 + ["PodDisruptionBudget"] * 2
    )
    assert {d["metadata"]["name"] for d in of_kind("Deployment")} == set(ROLE_OF)


def test_every_overlay_is_tested() -> None:
    overlays = {p for p in (KUSTOMIZE / "overlays").iterdir() if p.is_dir()}
    assert overlays == (set(TARGETS.values()) - {KUSTOMIZE / "base"}) | {FLEET}


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_fleet_objects_validate_strictly(version: str) -> None:
    for obj in objects():
        kubernetes_validate.validate(obj, version, strict=True)


def test_each_deployment_reads_its_own_role_config(name: str) -> None:
    assert raw_config(name)["roles"] == [ROLE_OF[name]]
    configmaps = {volume(pod(n), locate(exporter(n), config_path(n))[0]["name"])["configMap"]["name"] for n in ROLE_OF}
    assert len(configmaps) == 3


def test_role_configs_pass_the_exporters_validation(name: str, tmp_path: Path) -> None:
    if not fleet_support():
        pytest.skip("exporter.config has no fleet mode yet (Config.roles); runs once the fleet branch is merged")
    path = tmp_path / CONFIG_MOUNT_KEY
    path.write_text(config_text(name), encoding="utf-8")
    config = load_config(path, environ=environ(exporter(name)), check_system=False)  # the pod's files
    fleet: Any = config  # the fleet keys, typed once the fleet branch is merged
    role = ROLE_OF[name]
    assert {str(getattr(r, "value", r)) for r in fleet.roles} == {role}
    assert fleet.state.url == PLACEHOLDER_URL
    assert secret_file(name, fleet.state.password_file) == (DB_SECRET, "password")
    assert config.metrics.extra_labels == ("feature",)
    if role == "resolve":
        assert secret_file(name, config.zenmux.api_key_file) == (API_KEY_SECRET, "api-key")
    else:
        assert not config.zenmux.api_key and not config.zenmux.api_key_file
    if role == "ingest":
        (source,) = config.sources
        assert source.type == "file" and source.id_field == "generation_id"
        assert set(source.labels) <= set(config.metrics.extra_labels)
    else:
        assert config.sources == ()


# -- secrets: the API key only where lookups happen; the database from a Secret everywhere ------------------


def test_the_ingest_sidecar_holds_no_api_key() -> None:
    spec = pod(APP_DEPLOYMENT)
    assert not [v for v in spec["volumes"] if v.get("secret", {}).get("secretName") == API_KEY_SECRET]
    for c in spec.get("initContainers", []) + spec["containers"]:
        assert API_KEY_SECRET not in secrets_reaching(APP_DEPLOYMENT, c), c["name"]
    assert secrets_reaching(APP_DEPLOYMENT, exporter(APP_DEPLOYMENT)) == {DB_SECRET}
    assert secrets_reaching(APP_DEPLOYMENT, container(spec, APP)) == set()
    assert "zenmux" not in raw_config(APP_DEPLOYMENT)
    # The key cannot come in through the environment either.
    assert not re.search(r"api_key|ZENMUX_API_KEY", config_text(APP_DEPLOYMENT))


def test_the_resolvers_hold_the_api_key_and_the_exposer_does_not() -> None:
    zenmux = raw_config(RESOLVER)["zenmux"]
    assert "api_key" not in zenmux
    assert secret_file(RESOLVER, zenmux["api_key_file"]) == (API_KEY_SECRET, "api-key")
    assert secrets_reaching(RESOLVER, exporter(RESOLVER)) == {API_KEY_SECRET, DB_SECRET}
    assert secrets_reaching(EXPOSER, exporter(EXPOSER)) == {DB_SECRET}
    assert "zenmux" not in raw_config(EXPOSER)


def test_every_role_takes_the_database_from_the_secret(name: str) -> None:
    state = raw_config(name)["state"]
    assert "path" not in state, "fleet mode keeps no SQLite file"
    # Its default, the hostname, is the pod name: a fixed value would make two app pods' sources collide.
    assert "instance" not in state
    variable = re.fullmatch(r"\$\{(\w+)\}", state["url"])
    assert variable, "the URL comes from the environment, filled from the Secret"
    (var,) = [v for v in exporter(name).get("env", []) if v["name"] == variable[1]]
    assert var["valueFrom"]["secretKeyRef"] == {"name": DB_SECRET, "key": "url"}
    assert secret_file(name, state["password_file"]) == (DB_SECRET, "password")


def test_secret_files_are_readable_by_the_exporters_user(name: str) -> None:
    spec = pod(name)
    group = exporter(name)["securityContext"]["runAsGroup"]
    for mount in exporter(name)["volumeMounts"]:
        secret = volume(spec, mount["name"]).get("secret")
        if secret is None:
            continue
        mode = secret.get("defaultMode", 0o644)
        assert mode & 0o004 or (mode & 0o040 and spec["securityContext"].get("fsGroup") == group), (
            f"{name}: Secret {secret['secretName']} (mode {mode:o}) unreadable by group {group}"
        )


# -- ports, probes, scraping ---------------------------------------------------------------------------------


def test_ports_and_probes(name: str) -> None:
    c = exporter(name)
    host, _, port = raw_config(name)["metrics"]["listen"].rpartition(":")
    assert host in ("0.0.0.0", "") and int(port) == METRICS_PORT
    assert port_of(c, "metrics") == METRICS_PORT
    probes = {kind: c[kind]["httpGet"] for kind in ("startupProbe", "readinessProbe", "livenessProbe") if kind in c}
    # The probes have a plain port of their own (metrics.probe_listen), as in the base: they keep working
    # whatever TLS, client certificates or hostile clients do to /metrics.
    probe_host, _, probe_port = raw_config(name)["metrics"]["probe_listen"].rpartition(":")
    assert probe_host in ("0.0.0.0", "") and int(probe_port) == PROBE_PORT
    for probe in probes.values():
        assert port_of(c, probe["port"]) == PROBE_PORT
    # /readyz follows the database, /healthz does not: a database outage must not restart exporters (it would
    # not bring the database back) nor keep them from starting.
    assert probes["livenessProbe"]["path"] == probes["startupProbe"]["path"] == "/healthz"
    if ROLE_OF[name] == "ingest":
        # On the sidecar, readiness on /readyz would take every app pod out of its Service during a database
        # outage, while the log file holds the ids meanwhile.
        assert "readinessProbe" not in probes or probes["readinessProbe"]["path"] == "/healthz"
    else:
        assert probes["readinessProbe"]["path"] == "/readyz"


def test_every_exporter_pod_is_scraped_directly(name: str) -> None:
    annotations = deployment(name)["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(METRICS_PORT)
    assert annotations["prometheus.io/path"] == "/metrics"
    # Not through a Service: a VIP would hand each scrape to any exposer, leader or follower.
    assert not of_kind("Service")


# -- replicas, disruption, drain -----------------------------------------------------------------------------


@pytest.mark.parametrize("protected", [RESOLVER, EXPOSER])
def test_each_pdb_covers_exactly_its_deployment(protected: str) -> None:
    (pdb,) = [p for p in of_kind("PodDisruptionBudget") if p["metadata"]["name"] == protected]
    selector = pdb["spec"]["selector"]["matchLabels"]

    def selects(name: str) -> bool:
        return bool(selector.items() <= deployment(name)["spec"]["template"]["metadata"]["labels"].items())

    assert [name for name in ROLE_OF if selects(name)] == [protected]
    assert selector == deployment(protected)["spec"]["selector"]["matchLabels"]
    replicas = deployment(protected)["spec"]["replicas"]
    assert replicas == 2
    spec = pdb["spec"]
    assert spec.get("maxUnavailable") == 1 or spec.get("minAvailable") == 1
    # It protects one resolver and still lets a drain evict the other.
    allowed = spec["maxUnavailable"] if "maxUnavailable" in spec else replicas - spec["minAvailable"]
    assert 1 <= allowed < replicas


def test_deployments_select_only_their_own_pods() -> None:
    for name in ROLE_OF:
        selector = deployment(name)["spec"]["selector"]["matchLabels"]
        for other in set(ROLE_OF) - {name}:
            labels = deployment(other)["spec"]["template"]["metadata"]["labels"]
            assert not selector.items() <= labels.items(), f"{name} selects {other}'s pods"


def test_a_standby_exposer_waits_beside_the_leader() -> None:
    spec = deployment(EXPOSER)["spec"]
    # Leader and standby, on different nodes when there are several: losing one leaves the other to lead.
    assert spec["replicas"] == 2
    (spread,) = spec["template"]["spec"]["topologySpreadConstraints"]
    assert spread["topologyKey"] == "kubernetes.io/hostname"
    assert spread["labelSelector"]["matchLabels"] == spec["selector"]["matchLabels"]
    # A rollout starts a new pod (a follower) before an old one goes.
    assert spec["strategy"]["rollingUpdate"] == {"maxUnavailable": 0, "maxSurge": 1}


def drain_seconds(name: str) -> float:
    return float((raw_config(name).get("shutdown") or {}).get("drain_seconds", DEFAULT_DRAIN_SECONDS))


def test_grace_periods_cover_the_drains(name: str) -> None:
    grace = pod(name)["terminationGracePeriodSeconds"]
    app_time = APP_SHUTDOWN_SECONDS if name == APP_DEPLOYMENT else 0
    assert grace >= app_time + drain_seconds(name) + 5


def test_the_ingest_drain_is_short() -> None:
    # Pending ids are in PostgreSQL, not in the pod's emptyDir: nothing needs the billing delay waited out.
    assert drain_seconds(APP_DEPLOYMENT) <= MAX_INGEST_DRAIN_SECONDS
    assert pod(APP_DEPLOYMENT)["terminationGracePeriodSeconds"] <= APP_SHUTDOWN_SECONDS + MAX_INGEST_DRAIN_SECONDS + 15


# -- what the roles share --------------------------------------------------------------------------------------


def test_the_roles_agree_on_what_they_share() -> None:
    configs = {name: raw_config(name) for name in ROLE_OF}
    # Labels travel with the ids from ingest to the ledger and out of the exposer.
    assert len({tuple(c["metrics"]["extra_labels"]) for c in configs.values()}) == 1
    # One database, one dedupe window and queue bound (only state.instance may differ, and defaults).
    assert len({yaml.safe_dump(c["state"]) for c in configs.values()}) == 1
    # Due times are set at ingest, retries and give-up by the resolvers: one resolve section.
    assert configs[APP_DEPLOYMENT].get("resolve") == configs[RESOLVER].get("resolve")
    assert len({exporter(name)["image"] for name in ROLE_OF}) == 1


def test_the_sidecar_stays_a_native_sidecar() -> None:
    spec = pod(APP_DEPLOYMENT)
    assert exporter(APP_DEPLOYMENT) in spec["initContainers"]
    assert exporter(APP_DEPLOYMENT).get("restartPolicy") == "Always"


def test_security_contexts_are_strict(name: str) -> None:
    spec = pod(name)
    assert_strict(spec)
    user = re.search(r"^USER (\d+):(\d+)$", dockerfile(), re.MULTILINE)
    assert user is not None
    sc = exporter(name)["securityContext"]
    assert (sc["runAsUser"], sc["runAsGroup"]) == (int(user[1]), int(user[2]))


# -- what users build, push and mount ------------------------------------------------------------------------


def documented_state_url() -> str:
    """The URL docs/fleet.md tells users to put in the Secret zenmux-state-db."""
    text = (DOCS / "fleet.md").read_text()
    match = re.search(r"kubectl create secret generic zenmux-state-db \\\n\s+--from-literal=url='([^']+)'", text)
    assert match, "docs/fleet.md creates the Secret zenmux-state-db with its url"
    return match.group(1)


def test_the_documented_url_verifies_the_server_with_the_ca_every_role_mounts(name: str) -> None:
    url = documented_state_url()
    assert url.replace("postgres.example.svc", "postgres.example") == PLACEHOLDER_URL
    assert url_problem(url) == "" and "sslmode=verify-full" in url
    mount, relative = locate(exporter(name), ssl_root_cert(url))
    assert mount.get("readOnly") is True
    source = volume(pod(name), mount["name"])["configMap"]
    assert source["name"] == CA_CONFIGMAP
    assert {item["path"]: item["key"] for item in source.get("items", [])}.get(relative, relative) == "ca.crt"
    # The docs say how to create it.
    assert f"kubectl create configmap {CA_CONFIGMAP} --from-file=ca.crt=" in (DOCS / "fleet.md").read_text()


def test_every_exporter_runs_the_image_the_docs_say_to_build_and_push() -> None:
    text = (DOCS / "kubernetes.md").read_text()
    built = re.findall(r"docker build -t (\S+)", text)
    pushed = re.findall(r"docker push (\S+)", text)
    assert built and built == pushed
    for objects_ in (objects(), kustomize(KUSTOMIZE / "base")):
        specs = [d["spec"]["template"]["spec"] for d in objects_ if d["kind"] == "Deployment"]
        images = {container(spec, EXPORTER)["image"] for spec in specs}
        assert images == {pushed[0]}, "the manifests name an image nobody built (nothing is published)"


def test_the_billing_delay_is_the_real_apis_and_says_so() -> None:
    for name in (APP_DEPLOYMENT, RESOLVER):
        assert raw_config(name)["resolve"]["billing_delay_seconds"] == 240
        # Tried against the simulated API, 240 shows no cost for 4 minutes: the file says where seconds go.
        comment = config_text(name).split("billing_delay_seconds:")[0].rsplit("resolve:", 1)[1]
        assert "real API" in comment and "demo --fleet" in comment and "fake-api --billing-delay" in comment
