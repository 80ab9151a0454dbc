"""The kustomize base of k8s/, checked by real tools: every object against the Kubernetes schemas
(strict), the restricted Pod Security profile of every pod, and the sidecar's wiring (probes,
settings, secrets, the migration Job, the disruption budget)."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator

import kubernetes_validate
import pytest
import yaml

from outbox.settings import Settings
from tests.kustomize import K8S, Obj, load_resources, render

pytestmark = pytest.mark.timeout(120)

IMAGE = "ghcr.io/example/outbox:0.1.0"
# Native sidecars are on by default from 1.29; validate against that and the newest schemas.
K8S_VERSIONS = ("1.29.0", kubernetes_validate.utils.latest_version())


@pytest.fixture(scope="module")
def objects() -> list[Obj]:
    return render(K8S)


def by_kind(objects: list[Obj], kind: str) -> list[Obj]:
    return [o for o in objects if o["kind"] == kind]


def one(objects: list[Obj], kind: str) -> Obj:
    found = by_kind(objects, kind)
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def config(objects: list[Obj]) -> dict[str, str]:
    data: dict[str, str] = one(objects, "ConfigMap")["data"]
    return data


def pod_specs(objects: list[Obj]) -> Iterator[tuple[str, Obj]]:
    for o in objects:
        if o["kind"] in ("Deployment", "Job", "StatefulSet", "DaemonSet"):
            yield f"{o['kind']}/{o['metadata']['name']}", o["spec"]["template"]["spec"]
        elif o["kind"] == "CronJob":
            yield (f"CronJob/{o['metadata']['name']}",
                   o["spec"]["jobTemplate"]["spec"]["template"]["spec"])


def relay_container(objects: list[Obj]) -> Obj:
    pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    relays = [c for c in pod.get("initContainers", []) if c["image"] == IMAGE]
    assert len(relays) == 1, "the relay must be one init container (a native sidecar)"
    return relays[0]


# -- what a restricted pod must have -----------------------------------------------------------

def security_problems(where: str, pod: Obj) -> list[str]:
    """Everything the restricted Pod Security profile and DESIGN.md ask of a pod, as problems."""
    problems: list[str] = []
    psc = pod.get("securityContext") or {}
    if psc.get("runAsNonRoot") is not True:
        problems.append(f"{where}: pod securityContext.runAsNonRoot is not true")
    if (psc.get("seccompProfile") or {}).get("type") != "RuntimeDefault":
        problems.append(f"{where}: pod seccompProfile is not RuntimeDefault")
    if pod.get("hostNetwork") or pod.get("hostPID") or pod.get("hostIPC"):
        problems.append(f"{where}: pod shares a host namespace")
    containers = pod.get("containers", []) + pod.get("initContainers", [])
    for c in containers:
        at = f"{where}/{c['name']}"
        sc = c.get("securityContext") or {}
        if sc.get("runAsNonRoot") is not True:
            problems.append(f"{at}: runAsNonRoot is not true")
        if sc.get("runAsUser") == 0:
            problems.append(f"{at}: runs as UID 0")
        if sc.get("readOnlyRootFilesystem") is not True:
            problems.append(f"{at}: readOnlyRootFilesystem is not true")
        if sc.get("allowPrivilegeEscalation") is not False:
            problems.append(f"{at}: allowPrivilegeEscalation is not false")
        if sc.get("privileged"):
            problems.append(f"{at}: privileged")
        caps = sc.get("capabilities") or {}
        if caps.get("drop") != ["ALL"] or caps.get("add"):
            problems.append(f"{at}: capabilities do not drop ALL (or add some)")
        if (sc.get("seccompProfile") or {}).get("type") != "RuntimeDefault":
            problems.append(f"{at}: seccompProfile is not RuntimeDefault")
        res = c.get("resources") or {}
        if not {"cpu", "memory"} <= set(res.get("requests") or {}):
            problems.append(f"{at}: no cpu and memory requests")
        if "memory" not in (res.get("limits") or {}):
            problems.append(f"{at}: no memory limit")
        if ":" not in c["image"].rsplit("/", 1)[-1] or c["image"].endswith(":latest"):
            problems.append(f"{at}: image {c['image']} is not pinned to a tag")
    return problems


# -- schema validation -----------------------------------------------------------------------------

def test_kustomization_lists_every_manifest_of_the_base() -> None:
    listed = set(yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"])
    present = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == present


def test_renderer_agrees_with_the_plain_resources(objects: list[Obj]) -> None:
    """The fallback (no kubectl on the machine) must see what kustomize sees."""
    def names(objs: list[Obj]) -> list[tuple[str, str]]:
        return sorted((o["kind"], o["metadata"]["name"]) for o in objs)

    assert names(objects) == names(load_resources(K8S))
    assert {o["kind"] for o in objects} >= {
        "Deployment", "Job", "ConfigMap", "Secret", "PodDisruptionBudget", "Service"}


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_every_object_validates_strictly(objects: list[Obj], version: str) -> None:
    for obj in objects:
        kubernetes_validate.validate(obj, version, strict=True)


def test_strict_validation_rejects_a_misspelt_field(objects: list[Obj]) -> None:
    """Proves the validator bites: a typo in a container field fails in strict mode."""
    broken = copy.deepcopy(one(objects, "Deployment"))
    broken["spec"]["template"]["spec"]["initContainers"][0]["restartPolicyy"] = "Always"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSIONS[-1], strict=True)


# -- security --------------------------------------------------------------------------------------

def test_every_pod_and_container_is_restricted(objects: list[Obj]) -> None:
    specs = list(pod_specs(objects))
    assert {w.split("/")[0] for w, _ in specs} == {"Deployment", "Job"}
    problems = [p for where, pod in specs for p in security_problems(where, pod)]
    assert problems == []
    for _, pod in specs:
        assert pod.get("automountServiceAccountToken") is False


SECURITY_REMOVALS: list[tuple[str, Callable[[Obj], None]]] = [
    ("pod runAsNonRoot", lambda pod: pod["securityContext"].pop("runAsNonRoot")),
    ("pod seccomp", lambda pod: pod["securityContext"].pop("seccompProfile")),
    ("runAsNonRoot", lambda pod: pod["initContainers"][0]["securityContext"].pop("runAsNonRoot")),
    ("readOnlyRootFilesystem",
     lambda pod: pod["containers"][0]["securityContext"].pop("readOnlyRootFilesystem")),
    ("allowPrivilegeEscalation",
     lambda pod: pod["initContainers"][0]["securityContext"].update(
         allowPrivilegeEscalation=True)),
    ("capabilities", lambda pod: pod["containers"][0]["securityContext"].pop("capabilities")),
    ("container seccomp",
     lambda pod: pod["initContainers"][0]["securityContext"].pop("seccompProfile")),
    ("resources", lambda pod: pod["initContainers"][0].pop("resources")),
]


@pytest.mark.parametrize(("what", "remove"), SECURITY_REMOVALS,
                         ids=[r[0] for r in SECURITY_REMOVALS])
def test_removing_a_security_setting_is_caught(
    objects: list[Obj], what: str, remove: Callable[[Obj], None],
) -> None:
    pod = copy.deepcopy(one(objects, "Deployment")["spec"]["template"]["spec"])
    assert security_problems("pod", pod) == []
    remove(pod)
    assert security_problems("pod", pod) != [], f"removing {what} went unnoticed"


# -- the sidecar wiring ----------------------------------------------------------------------------

def test_relay_is_a_native_sidecar_with_probes_on_its_port(objects: list[Obj]) -> None:
    relay = relay_container(objects)
    assert relay["restartPolicy"] == "Always"
    assert relay.get("args", ["relay"]) == ["relay"]
    port = int(config(objects).get("OUTBOX_HTTP_PORT", Settings().http_port))
    ports = {p["name"]: p["containerPort"] for p in relay["ports"]}
    for probe in ("startupProbe", "livenessProbe"):
        get = relay[probe]["httpGet"]
        assert get["path"] == "/healthz"
        assert ports.get(get["port"], get["port"]) == port
    pod = one(objects, "Deployment")["spec"]["template"]
    assert pod["metadata"]["annotations"]["prometheus.io/port"] == str(port)


def test_grace_period_outlasts_the_relays_shutdown(objects: list[Obj]) -> None:
    timeout = float(config(objects).get("OUTBOX_SHUTDOWN_TIMEOUT", Settings().shutdown_timeout))
    grace = one(objects, "Deployment")["spec"]["template"]["spec"][
        "terminationGracePeriodSeconds"]
    # The application stops first, then the sidecar: both within one grace period.
    assert grace >= timeout + 10


def test_configmap_holds_valid_non_secret_settings(objects: list[Obj]) -> None:
    data = config(objects)
    from dataclasses import fields

    known = {f.metadata["env"]: f for f in fields(Settings)}
    assert set(data) <= set(known), f"unknown settings: {set(data) - set(known)}"
    assert not [k for k in data if known[k].metadata["secret"]], "secrets belong in the Secret"
    Settings.load(environ=data)  # raises ConfigError on a bad value


def test_secrets_are_mounted_files_the_settings_read(objects: list[Obj]) -> None:
    secret = one(objects, "Secret")
    keys = set(secret.get("stringData", {})) | set(secret.get("data", {}))
    for where, pod in pod_specs(objects):
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        for c in pod.get("containers", []) + pod.get("initContainers", []):
            if c["image"] != IMAGE:
                continue
            env = {e["name"]: e for e in c.get("env", [])}
            assert "OUTBOX_DATABASE_URL" not in env and "OUTBOX_AMQP_URL" not in env
            wanted = ["OUTBOX_DATABASE_URL_FILE"]
            if c.get("args", ["relay"])[0] == "relay":
                wanted.append("OUTBOX_AMQP_URL_FILE")
            for var in wanted:
                path = env[var]["value"]
                mounts = [m for m in c["volumeMounts"] if path.startswith(m["mountPath"] + "/")]
                assert len(mounts) == 1, f"{where}: {var}={path} is on no mount"
                assert mounts[0].get("readOnly") is True
                volume = volumes[mounts[0]["name"]]["secret"]
                assert volume["secretName"] == secret["metadata"]["name"]
                items = {i["path"]: i["key"] for i in volume.get("items", [])}
                key = items.get(path[len(mounts[0]["mountPath"]) + 1:])
                assert key in keys, f"{where}: {path} maps to no key of the Secret"


def test_migration_job_runs_migrate_with_the_owner_url(objects: list[Obj]) -> None:
    job = one(objects, "Job")
    pod = job["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["image"] == IMAGE and container["args"] == ["migrate"]
    assert pod["restartPolicy"] in ("Never", "OnFailure")
    items = pod["volumes"][0]["secret"]["items"]
    assert {"key": "migrate-database-url", "path": "database-url"} in items


def test_disruption_budget_and_service_select_the_pods(objects: list[Obj]) -> None:
    labels = one(objects, "Deployment")["spec"]["template"]["metadata"]["labels"]
    pdb = one(objects, "PodDisruptionBudget")["spec"]
    assert pdb["selector"]["matchLabels"].items() <= labels.items()
    service = one(objects, "Service")["spec"]
    assert service["selector"].items() <= labels.items()
    relay_ports = {p["name"] for p in relay_container(objects)["ports"]}
    assert {p["targetPort"] for p in service["ports"]} <= relay_ports
