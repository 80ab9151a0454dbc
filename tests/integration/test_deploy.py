"""The deployment artefacts, checked by real tools: the kustomize base against the Kubernetes
schemas (strict), the Dockerfile with hadolint, the alert rules and dashboard against the metrics
the relay really exports, and the least-privilege roles of sql/roles.sql against a real relay."""

from __future__ import annotations

import copy
import fnmatch
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import psycopg
import pytest
import yaml
from prometheus_client import generate_latest
from psycopg import errors, sql

from outbox import producer
from outbox.metrics import REGISTRY
from outbox.settings import Settings
from tests import support

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"
IMAGE = "ghcr.io/example/outbox:0.1.0"
# Native sidecars are on by default from 1.29; validate against that and the newest schemas.
K8S_VERSIONS = ("1.29.0", kubernetes_validate.utils.latest_version())
Obj = dict[str, Any]


# -- rendering -------------------------------------------------------------------------------------

def _kubectl() -> str | None:
    return shutil.which("kubectl") or shutil.which("kustomize")


def render(directory: Path) -> list[Obj]:
    """The kustomize output: `kubectl kustomize` when installed, else the listed resources."""
    tool = _kubectl()
    if tool is not None:
        cmd = [tool, "kustomize", str(directory)] if tool.endswith("kubectl") else \
              [tool, "build", str(directory)]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=True)
        return [d for d in yaml.safe_load_all(out.stdout) if d]
    return load_resources(directory)


def load_resources(directory: Path) -> list[Obj]:
    """What kustomize does for a base that only lists plain resources."""
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    assert set(kustomization) <= {"apiVersion", "kind", "resources"}, \
        "the fallback renderer only handles plain resources"
    docs: list[Obj] = []
    for name in kustomization["resources"]:
        docs += [d for d in yaml.safe_load_all((directory / name).read_text()) if d]
    return docs


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


# -- monitoring ------------------------------------------------------------------------------------

def exported_series() -> set[str]:
    """Every sample name the relay's /metrics can show (``_total``, ``_bucket``...)."""
    text = generate_latest(REGISTRY).decode()
    return {line.split("{")[0].split(" ")[0] for line in text.splitlines()
            if line and not line.startswith("#")}


def referenced_metrics(text: str) -> set[str]:
    return set(re.findall(r"\boutbox_[a-z_]+[a-z]\b", text))


def test_alert_rules_cover_the_failure_modes_with_real_metrics() -> None:
    rules_doc = yaml.safe_load((K8S / "monitoring" / "alerts.yaml").read_text())
    rules = [r for g in rules_doc["spec"]["groups"] for r in g["rules"]]
    series = exported_series()
    used: set[str] = set()
    for rule in rules:
        assert {"alert", "expr", "labels", "annotations"} <= set(rule), rule
        assert rule["labels"]["severity"] in ("warning", "critical")
        assert rule["annotations"]["summary"]
        names = referenced_metrics(rule["expr"])
        assert names and names <= series, f"{rule['alert']}: unknown {names - series}"
        used |= names
    assert {"outbox_oldest_pending_age_seconds", "outbox_dead_rows", "outbox_blocked_keys",
            "outbox_ready", "outbox_connected", "outbox_publish_failures_total"} <= used


def test_dashboard_queries_real_metrics() -> None:
    dashboard = json.loads((K8S / "monitoring" / "dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    assert len(exprs) >= 10
    series = exported_series()
    for expr in exprs:
        names = referenced_metrics(expr)
        assert names and names <= series, f"unknown {names - series} in {expr}"
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))


def test_monitoring_kustomization_renders() -> None:
    kinds = {o["kind"] for o in render(K8S / "monitoring")}
    assert kinds == {"ServiceMonitor", "PrometheusRule"}


# -- Dockerfile ------------------------------------------------------------------------------------

def hadolint(path: Path) -> list[dict[str, Any]]:
    exe = Path(sys.executable).parent / "hadolint"
    cmd = [str(exe if exe.exists() else "hadolint"), "--no-fail", "-f", "json"]
    if (ROOT / ".hadolint.yaml").exists():
        cmd += ["--config", str(ROOT / ".hadolint.yaml")]
    out = subprocess.run([*cmd, str(path)], capture_output=True, text=True, timeout=60,
                         check=True)
    findings: list[dict[str, Any]] = json.loads(out.stdout or "[]")
    return findings


def test_dockerfile_passes_hadolint() -> None:
    assert hadolint(ROOT / "Dockerfile") == []


def test_hadolint_really_lints(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN apt-get install gcc\nRUN pip install orjson\n")
    codes = {f["code"] for f in hadolint(bad)}
    assert {"DL3007", "DL3008"} <= codes


def test_dockerfile_shape() -> None:
    lines = [ln.strip() for ln in (ROOT / "Dockerfile").read_text().splitlines()]
    instructions = [ln for ln in lines if ln and not ln.startswith("#")]
    froms = [i for i, ln in enumerate(instructions) if ln.startswith("FROM ")]
    assert len(froms) >= 2, "multi-stage"
    final = instructions[froms[-1]:]
    text = "\n".join(final)
    assert re.search(r"^USER [1-9]\d*(:\d+)?$", text, re.M), "fixed non-root numeric UID"
    assert 'ENTRYPOINT ["outbox"]' in final and 'CMD ["relay"]' in final
    assert not re.search(r"\b(gcc|g\+\+|build-essential|make|cc)\b", text), "compiler in final"
    assert "slim" in (ROOT / "Dockerfile").read_text().split("AS build")[0]


def test_build_context_holds_what_the_dockerfile_copies() -> None:
    patterns = [ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()
                if ln.strip() and not ln.startswith("#")]

    def included(rel: str) -> bool:
        keep = True
        for pat in patterns:
            negate = pat.startswith("!")
            pat = pat.lstrip("!").rstrip("/")
            if fnmatch.fnmatch(rel, pat) or pat == "**" or fnmatch.fnmatch(rel, pat + "/*"):
                keep = negate
        return keep

    copied = []
    for ln in (ROOT / "Dockerfile").read_text().splitlines():
        if ln.startswith("COPY ") and "--from" not in ln:
            copied += ln.split()[1:-1]
    assert copied
    for src in copied:
        assert (ROOT / src).exists(), src
        assert included(src), f"{src} is excluded by .dockerignore"
    for private in (".venv", ".git", "tests", "outbox/__pycache__/x.pyc"):
        assert not included(private), f"{private} would be sent to the build"


# -- least-privilege roles -------------------------------------------------------------------------

@pytest.fixture
def roles(schema: str) -> Iterator[dict[str, str]]:
    """The roles of sql/roles.sql, created by psql for the fresh schema; dropped afterwards."""
    tag = support.unique("r")
    names = {"relay_role": f"{tag}_relay", "producer_role": f"{tag}_producer",
             "consumer_role": f"{tag}_consumer"}
    psql = shutil.which("psql")
    if psql is None:
        pytest.fail("psql is needed to run sql/roles.sql (it uses psql variables)")
    cmd = [psql, support.DATABASE_URL, "-X", "-q", "-v", "ON_ERROR_STOP=1", "-v",
           f"schema={schema}", "-f", str(ROOT / "sql" / "roles.sql")]
    for var, value in names.items():
        cmd += ["-v", f"{var}={value}"]
    try:
        for _ in range(2):  # the script can be run again
            subprocess.run(cmd, check=True, capture_output=True, timeout=60)
        yield names
    finally:
        with psycopg.connect(support.DATABASE_URL, autocommit=True) as conn:
            for role in names.values():
                ident = sql.Identifier(role)
                if conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,)).fetchone():
                    conn.execute(sql.SQL("DROP OWNED BY {}").format(ident))
                    conn.execute(sql.SQL("DROP ROLE {}").format(ident))


def as_role(role: str) -> str:
    parts = support.DATABASE_URL.split("://", 1)[1].split("@", 1)[-1]
    return f"postgresql://{role}@{parts}"


def refused(conn: psycopg.Connection[Any], statement: sql.Composable) -> None:
    with pytest.raises(errors.InsufficientPrivilege), conn.transaction():
        conn.execute(statement)


async def test_relay_role_runs_the_relay_and_nothing_more(
    schema: str, queue: str, roles: dict[str, str],
) -> None:
    relay_role = roles["relay_role"]
    owner = support.make_settings(schema)
    ids = support.insert_rows(owner, 50, queue)
    settings = support.make_settings(schema, database_url=as_role(relay_role))
    async with support.Consumer(queue) as consumer:
        proc = support.start_relay(settings, "--drain")
        try:
            _, stderr = proc.communicate(timeout=60)
        finally:
            support.stop_process(proc)
        assert proc.returncode == 0, stderr.decode()[-2000:]
        await consumer.wait_for(len(ids), timeout=30)
        await consumer.quiet(0.3)
    assert set(consumer.message_ids) == {str(i) for i in ids}
    assert len(consumer.message_ids) == len(ids)  # no duplicates
    assert support.count(owner) == 0  # every confirmed row deleted, none left or dead

    # `outbox doctor` finds nothing missing for this role, and no excess.
    env = support.relay_env(settings)
    doctor = subprocess.run(support.outbox_cmd("doctor"), env=env, capture_output=True,
                            text=True, timeout=90)
    assert doctor.returncode == 0, doctor.stdout + doctor.stderr
    assert "ok    grants" in doctor.stdout

    s = sql.Identifier(schema)
    with psycopg.connect(settings.database_url, autocommit=True) as conn:
        user = conn.execute("SELECT current_user").fetchone()
        assert user is not None and user[0] == relay_role
        refused(conn, sql.SQL("ALTER TABLE {}.outbox ADD COLUMN x int").format(s))
        refused(conn, sql.SQL("ALTER TABLE {}.outbox DISABLE TRIGGER outbox_notify").format(s))
        refused(conn, sql.SQL("DROP TABLE {}.outbox").format(s))
        refused(conn, sql.SQL("TRUNCATE {}.outbox").format(s))
        refused(conn, sql.SQL("CREATE TABLE {}.evil (x int)").format(s))
        refused(conn, sql.SQL("CREATE INDEX evil ON {}.outbox (id)").format(s))
        refused(conn, sql.SQL("INSERT INTO {}.outbox (routing_key, payload) "
                              "VALUES ('x', '{{}}')").format(s))
        refused(conn, sql.SQL("UPDATE {}.outbox SET payload = '{{}}'").format(s))
        refused(conn, sql.SQL("SELECT * FROM {}.inbox").format(s))


def test_producer_and_consumer_roles_do_only_their_part(
    schema: str, roles: dict[str, str],
) -> None:
    s = sql.Identifier(schema)
    with psycopg.connect(as_role(roles["producer_role"])) as conn:
        # the library's insert and the minimal insert of any language, both with RETURNING
        message_id = producer.enqueue(conn, "orders.created", {"id": 1}, schema=schema,
                                      ordering_key="o-1")
        row = conn.execute(sql.SQL("INSERT INTO {}.outbox (routing_key, payload) VALUES "
                                   "('orders.created', '{{\"id\": 2}}') RETURNING message_id")
                           .format(s)).fetchone()
        assert row is not None and row[0] != message_id
        conn.commit()
        refused(conn, sql.SQL("SELECT payload FROM {}.outbox").format(s))
        refused(conn, sql.SQL("UPDATE {}.outbox SET dead_at = now()").format(s))
        refused(conn, sql.SQL("DELETE FROM {}.outbox").format(s))
        refused(conn, sql.SQL("INSERT INTO {}.outbox (routing_key, payload, sent_at) "
                              "VALUES ('x', '{{}}', now())").format(s))
        refused(conn, sql.SQL("SELECT * FROM {}.inbox").format(s))
    assert support.count(support.make_settings(schema)) == 2

    consumer_url = as_role(roles["consumer_role"])
    with psycopg.connect(consumer_url, autocommit=True) as conn:
        record = sql.SQL("INSERT INTO {}.inbox (consumer, message_id) VALUES (%s, %s) "
                         "ON CONFLICT DO NOTHING").format(s)
        assert conn.execute(record, ("billing", message_id)).rowcount == 1
        assert conn.execute(record, ("billing", message_id)).rowcount == 0
        refused(conn, sql.SQL("SELECT * FROM {}.outbox").format(s))
        refused(conn, sql.SQL("DROP TABLE {}.inbox").format(s))
    env = {k: v for k, v in os.environ.items() if not k.startswith("OUTBOX_")}
    prune = subprocess.run(
        support.outbox_cmd("inbox", "prune", "--older-than", "0s", "--database-url",
                           consumer_url, "--schema", schema),
        env=env, capture_output=True, text=True, timeout=60)
    assert prune.returncode == 0, prune.stderr
    assert "deleted 1 inbox entries" in prune.stdout
