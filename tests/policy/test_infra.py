"""The project's own policies for infra/, the ones no standard linter knows. Syntax, schemas and
the generic hardening checks are the linters' (.ci/lint-infra: hadolint, shellcheck, the
Kubernetes, KubeRay and compose schemas, checkov; docs/cluster.md). Here: closed by default
(loopback-only ports, auth always on, credentials from Secrets or required variables, never
inline, NetworkPolicies that admit exactly the clients), every container of every manifest
hardened to the restricted Pod Security Standard (KubeRay's Ray pods and job submitter too, which
checkov does not scan) in one namespace, pinned images and locks, and the files agreeing with
each other and with the project (one image, stock Ray nodes, a RayJob the config loader
accepts). No network, no docker, no Ray or MLflow started."""

from __future__ import annotations

import configparser
import re
import shlex
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest

from tests.policy.infra_files import (
    INFRA,
    ROOT,
    admitted,
    binds_loopback_only,
    compose_services,
    dockerfile_user,
    docs,
    k8s_by_kind_name,
    k8s_documents,
    kuberay_specs,
    manifests,
    matches,
    namespace_pods,
    one,
    pinned,
    pod_specs,
    read_lock,
    rel,
    walk,
)

NAMESPACE = "visiontune"
# The one name of each image built here; change it here and in infra/ together.
IMAGE, MLFLOW_IMAGE = "visiontune:0.1.0", "visiontune-mlflow:0.1.0"
BUILT_HERE = {IMAGE: INFRA / "Dockerfile", MLFLOW_IMAGE: INFRA / "mlflow/Dockerfile"}
DATA_CLAIM, DATA_MOUNT = "visiontune-data", "/mnt/data"
# Resources every Ray node has without being asked for: anything else is a custom resource,
# which would make the pipeline depend on a special `ray start`.
BUILTIN_RESOURCES = {"CPU", "GPU", "memory", "object_store_memory"}
# Volume types the restricted Pod Security Standard allows.
RESTRICTED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral",
                      "persistentVolumeClaim", "projected", "secret"}
PODS = pod_specs()


def test_infra_readme_describes_every_file():
    readme = (INFRA / "README.md").read_text()
    files = [str(p.relative_to(INFRA)) for p in INFRA.rglob("*") if p.is_file()]
    assert [f for f in files if f != "README.md" and f not in readme] == []


# --- one namespace, restricted pods ---------------------------------------------------------------


def test_one_namespace_enforces_the_restricted_standard():
    (namespace,) = [d for _, d in manifests() if d["kind"] == "Namespace"]
    assert namespace["metadata"]["name"] == NAMESPACE
    labels = namespace["metadata"]["labels"]
    for mode in ("enforce", "audit", "warn"):
        assert labels[f"pod-security.kubernetes.io/{mode}"] == "restricted", mode
    others = [(rel(p), d["kind"], d["metadata"]["name"], d["metadata"].get("namespace"))
              for p, d in manifests() if d["kind"] != "Namespace"]
    assert len(others) >= 17
    assert [o for o in others if o[3] != NAMESPACE] == []


def test_the_walk_finds_every_pod():
    names = {where.split(" ", 1)[1] for where, _ in PODS}
    assert names == {"StatefulSet/postgres", "StatefulSet/minio", "Job/minio-create-bucket",
                     "Deployment/mlflow", "RayCluster/visiontune head", "RayCluster/visiontune gpu",
                     "RayJob/visiontune-train head", "RayJob/visiontune-train gpu",
                     "RayJob/visiontune-train submitter"}


@pytest.mark.parametrize("where, pod", PODS, ids=[w for w, _ in PODS])
def test_every_pod_is_restricted_and_has_no_token(where, pod):
    assert pod.get("automountServiceAccountToken") is False
    context = pod["securityContext"]
    assert context["runAsNonRoot"] is True
    assert isinstance(context["runAsUser"], int) and context["runAsUser"] > 0
    assert context["seccompProfile"] == {"type": "RuntimeDefault"}
    assert not any(pod.get(k) for k in ("hostNetwork", "hostPID", "hostIPC"))
    for volume in pod.get("volumes", []):
        assert set(volume) - {"name"} <= RESTRICTED_VOLUMES, volume


@pytest.mark.parametrize("where, pod", PODS, ids=[w for w, _ in PODS])
def test_every_container_is_hardened_and_bounded(where, pod):
    tmp = {v["name"] for v in pod.get("volumes", []) if "emptyDir" in v}
    for c in pod.get("initContainers", []) + pod["containers"]:
        name = f"{where}: {c['name']}"
        context = c["securityContext"]
        assert context["allowPrivilegeEscalation"] is False, name
        assert context["capabilities"] == {"drop": ["ALL"]}, name
        assert context["readOnlyRootFilesystem"] is True, name
        assert not context.get("privileged") and context.get("runAsUser", 1) > 0, name
        assert not any("hostPort" in p for p in c.get("ports", [])), name
        for kind in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(c["resources"][kind]), f"{name}: {kind}"
        # The root file system is read-only: what writes to /tmp writes to an emptyDir.
        if c["name"] not in ("refuse-placeholder-secrets", "wait-for-postgres"):
            mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
            assert mounts.get("/tmp") in tmp, f"{name}: no writable /tmp"


def test_images_built_here_run_as_their_own_numeric_non_root_user():
    users = {image: dockerfile_user(path) for image, path in BUILT_HERE.items()}
    assert users == {IMAGE: 1000, MLFLOW_IMAGE: 10001}
    for where, pod in PODS:
        for c in pod.get("initContainers", []) + pod["containers"]:
            if c["image"] in users:
                assert pod["securityContext"]["runAsUser"] == users[c["image"]], where


# --- closed by default ----------------------------------------------------------------------------


@pytest.mark.parametrize("port, loopback", [
    *((p, False) for p in ("5000:5000", "5000", 5000, "0.0.0.0:5000:5000", "[::]:5000:5000",
                           "10.0.0.5:5000:5000", "${HOST_IP}:5000:5000",
                           {"target": 5000, "published": 5000},
                           {"target": 5000, "published": 5000, "host_ip": "0.0.0.0"})),
    *((p, True) for p in ("127.0.0.1:5000:5000", "127.0.0.1:9001:9001/tcp", "[::1]:5000:5000",
                          "${BIND:-127.0.0.1}:5000:5000",
                          {"target": 5000, "published": 5000, "host_ip": "127.0.0.1"})),
])
def test_port_check_tells_loopback_from_open_ports(port, loopback):
    assert binds_loopback_only(port) is loopback


def test_compose_publishes_on_loopback_only_and_never_the_stores():
    services = compose_services()
    for name, service in services.items():
        assert service.get("network_mode") != "host", name
        assert all(binds_loopback_only(p) for p in service.get("ports", [])), name
    assert "ports" not in services["postgres"]
    assert all(not str(p).endswith(":9000") for p in services["minio"].get("ports", []))


# Compose variables that hold a credential: each must be `${VAR:?message}` wherever it is read.
COMPOSE_CREDENTIALS = {"POSTGRES_PASSWORD", "MINIO_ROOT_USER", "MINIO_ROOT_PASSWORD",
                       "MLFLOW_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY"}
COMPOSE_REF = re.compile(r"\$\$|\$\{(\w+)([^}]*)\}|\$(\w+)")


def test_compose_credentials_are_required_with_no_default():
    seen = set()
    for text in walk(one(INFRA / "mlflow/docker-compose.yaml"), strings=True):
        for m in COMPOSE_REF.finditer(text):
            name = m.group(1) or m.group(3)
            if name in COMPOSE_CREDENTIALS:
                seen.add(name)
                # `${VAR:?message}` only: not `$VAR`, `${VAR}`, `${VAR:-default}`, `${VAR?}`.
                assert m.group(1) and re.fullmatch(r":\?.+", m.group(2)), m.group(0)
    assert seen == COMPOSE_CREDENTIALS


def is_credential(name: str) -> bool:
    return bool(re.search(r"PASSWORD|SECRET|TOKEN|ACCESS_KEY|_USER(NAME)?$", name))


def test_no_credential_is_inline_in_any_manifest():
    secrets = {name: set(d.get("stringData", {})) | set(d.get("data", {}))
               for (kind, name), d in k8s_by_kind_name().items() if kind == "Secret"}
    checked = 0
    for where, pod in PODS:
        secret_dirs = {m["mountPath"] for c in pod.get("initContainers", []) + pod["containers"]
                       for m in c.get("volumeMounts", [])
                       if any(v["name"] == m["name"] and "secret" in v for v in pod["volumes"])}
        for c in pod.get("initContainers", []) + pod["containers"]:
            for e in c.get("env", []):
                if e["name"].endswith("_FILE"):     # a credential read from the Secret's files
                    assert str(Path(e["value"]).parent) in secret_dirs, f"{where}: {e}"
                elif is_credential(e["name"]):
                    ref = e["valueFrom"]["secretKeyRef"]          # never `value:`
                    assert ref.get("optional") or ref["key"] in secrets[ref["name"]], ref
                    checked += 1
    assert checked >= 15


def test_the_secret_holds_placeholders_the_mlflow_pod_refuses():
    secret = k8s_by_kind_name()[("Secret", "mlflow-secrets")]["stringData"]
    values = {k: v for k, v in secret.items() if k != "POSTGRES_USER"}
    assert values and all(v.startswith("CHANGE-ME") for v in values.values()), values
    pod = k8s_by_kind_name()[("Deployment", "mlflow")]["spec"]["template"]["spec"]
    (check,) = [c for c in pod["initContainers"] if c["name"] == "refuse-placeholder-secrets"]
    assert {e["name"] for e in check["env"]} == set(values)
    assert "$(" not in " ".join(check["args"])          # Kubernetes would expand $(VAR) itself

    def run(env):
        return subprocess.run([shutil.which("sh"), "-c", *check["args"]], env=env,
                              capture_output=True, text=True, timeout=10)

    good = {k: f"s3cret-{k.lower()}-0123456789" for k in values}
    assert run(secret).returncode == 1 and run(good).returncode == 0
    for name in values:
        for bad in ("", "CHANGE-ME-later"):
            result = run({**good, name: bad})
            assert result.returncode == 1 and "CHANGE-ME" in result.stderr, name


def test_mlflow_always_runs_basic_auth_with_no_working_default_password():
    compose = compose_services()["mlflow"]
    assert " ".join(compose["command"]).startswith("mlflow server --app-name basic-auth ")
    pod = k8s_by_kind_name()[("Deployment", "mlflow")]["spec"]["template"]["spec"]
    (server,) = pod["containers"]
    assert server["command"] + server["args"][:2] == ["mlflow", "server", "--app-name",
                                                      "basic-auth"]
    env = {e["name"]: e for e in server["env"]}
    for name in ("MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY"):
        assert not env[name]["valueFrom"]["secretKeyRef"].get("optional"), name
    # The ConfigMap is basic_auth.ini (comments aside), closed by default.
    text = k8s_by_kind_name()[("ConfigMap", "mlflow-auth")]["data"]["basic_auth.ini"]
    in_k8s, in_file = configparser.ConfigParser(), configparser.ConfigParser()
    in_k8s.read_string(text)
    in_file.read(INFRA / "mlflow/basic_auth.ini")
    assert dict(in_k8s["mlflow"]) == dict(in_file["mlflow"])
    assert in_file["mlflow"]["default_permission"] in {"NO_PERMISSIONS", "READ"}
    from mlflow.exceptions import MlflowException
    from mlflow.utils.validation import _validate_password

    with pytest.raises(MlflowException):                # the placeholder is no password
        _validate_password(in_file["mlflow"]["admin_password"])


def test_services_stay_in_the_cluster():
    for (kind, name), doc in k8s_by_kind_name().items():
        assert kind not in ("Ingress", "Route"), name
        if kind == "Service":
            assert doc["spec"].get("type", "ClusterIP") == "ClusterIP", name
    for name, spec in kuberay_specs().items():
        assert spec["headGroupSpec"].get("serviceType", "ClusterIP") == "ClusterIP", name


def test_network_policies_deny_by_default_and_admit_only_the_clients():
    policies = [d for d in k8s_documents() if d["kind"] == "NetworkPolicy"]
    deny = [p for p in policies if not p["spec"].get("ingress")]
    assert deny and all(p["spec"]["policyTypes"] == ["Ingress"] for p in deny)
    for pod, labels in namespace_pods().items():    # every pod of k8s.yaml is closed first
        assert "/" in pod or any(matches(p["spec"]["podSelector"], labels) for p in deny), pod
    ray_pods = {p for p in namespace_pods() if "/" in p}
    assert len(ray_pods) == 4            # RayCluster and RayJob: head and GPU workers
    assert admitted("mlflow") == (ray_pods, {5000})
    assert admitted("postgres") == ({"mlflow"}, {5432})
    assert admitted("minio") == ({"mlflow", "minio-create-bucket"}, {9000})
    assert admitted("minio-create-bucket") == (set(), set())


def test_compose_env_file_is_ignored_by_git():
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    for name in ("infra/mlflow/.env", "infra/mlflow/.env.local"):
        result = subprocess.run(["git", "check-ignore", "-q", name], cwd=ROOT, timeout=10)
        assert result.returncode == 0, f"{name} is not git-ignored"


@pytest.mark.parametrize("script", sorted(INFRA.rglob("*.sh")), ids=rel)
def test_local_scripts_are_strict_bash_bound_to_loopback(script):
    text = script.read_text()
    assert text.startswith("#!/usr/bin/env bash\n") and "set -euo pipefail" in text
    assert re.search(r"127\.0\.0\.1", text) and "0.0.0.0" not in text
    # An unknown command is a usage error; nothing is started.
    result = subprocess.run(["bash", str(script), "no-such-command"], capture_output=True,
                            text=True, timeout=10)
    assert result.returncode == 2 and "usage:" in result.stderr


# --- pinned images and locks ----------------------------------------------------------------------


@pytest.mark.parametrize("image, fixed", [
    *((i, False) for i in ("postgres", "postgres:16", "postgres:latest", "python:3.11-slim",
                           "minio/minio:latest", "minio/mc", "ghcr.io/org/visiontune:latest",
                           "localhost:5000/visiontune", "nvidia/cuda:12.8-runtime-ubuntu24.04",
                           "rayproject/ray:2.60")),
    *((i, True) for i in ("postgres:16.9-bookworm", "python:3.11.13-slim-bookworm",
                          "localhost:5000/visiontune:0.1.0", "rayproject/ray:2.60.0-py311",
                          "minio/mc:RELEASE.2025-08-13T08-35-41Z")),
])
def test_image_check_tells_fixed_tags_from_floating_ones(image, fixed):
    assert pinned(image) is fixed


def test_no_image_in_infra_floats():
    images = [(rel(p), v) for p in sorted(INFRA.rglob("*.yaml")) for d in docs(p)
              for m in walk(d) for k, v in m.items()
              if (k == "image" or str(k).endswith("_image")) and isinstance(v, str)]
    images += [(rel(p), line.split()[1]) for p in BUILT_HERE.values()
               for line in p.read_text().splitlines() if line.startswith("FROM ")]
    assert len(images) >= 15
    assert [(f, i) for f, i in images if not pinned(i)] == []
    for path in INFRA.rglob("*"):          # nor in a comment: no `latest` tag anywhere
        if path.is_file() and path.suffix != ".json":
            assert not re.search(r"[\w./-]:latest\b", path.read_text()), rel(path)


def test_python_packages_come_from_the_locks():
    # Every pip install of a Dockerfile is constrained by its lock, or pins what it names.
    for path in BUILT_HERE.values():
        lines = [ln for ln in path.read_text().splitlines() if not ln.lstrip().startswith("#")]
        text = re.sub(r"\\\n", " ", "\n".join(lines))
        installs = re.findall(r"pip install ([^&\n]+)", text)
        assert installs, rel(path)
        for args in installs:
            reqs = [a for a in shlex.split(args) if not a.startswith("-")]
            assert "-c " in args or all("==" in r for r in reqs), f"{rel(path)}: {args}"
    requirements = pytest.importorskip("packaging.requirements")
    pins, server = read_lock(INFRA / "requirements-lock.txt"), read_lock(
        INFRA / "mlflow/requirements-lock.txt")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for dep in project["dependencies"]:
        req = requirements.Requirement(dep)
        name = re.sub(r"[-_.]+", "-", req.name).lower()
        assert req.specifier.contains(pins[name], prereleases=True), f"{dep} vs {pins.get(name)}"
    # The server runs the MLflow (and every shared package) visiontune's clients run.
    assert {n: (v, pins[n]) for n, v in server.items() if n in pins and pins[n] != v} == {}
    assert f"MLFLOW_VERSION={pins['mlflow']}" in (INFRA / "mlflow/Dockerfile").read_text()


# --- the files agree with each other and with the project ---------------------------------------


def test_one_image_and_one_ray_version_everywhere():
    name = re.compile(r"(?<![\w.-])(?:[\w.-]+/)*visiontune(?:-mlflow)?:[\w.-]+")
    for path in INFRA.rglob("*"):
        if path.is_file() and path.suffix != ".json":
            for ref in name.findall(path.read_text()):   # a registry in front is fine
                assert ref.split("/")[-1] in (IMAGE, MLFLOW_IMAGE), f"{rel(path)}: {ref}"
    for image, path in BUILT_HERE.items():
        assert f"-t {image} " in path.read_text()
    assert one(INFRA / "ray-cluster-launcher.yaml")["docker"]["image"] == IMAGE
    assert compose_services()["mlflow"]["image"] == MLFLOW_IMAGE
    ray = read_lock(INFRA / "requirements-lock.txt")["ray"]
    assert f"ARG RAY_VERSION={ray}\n" in (INFRA / "Dockerfile").read_text()
    assert {spec["rayVersion"] for spec in kuberay_specs().values()} == {ray}


def test_every_ray_node_is_stock_ray():
    """No custom resources anywhere: what a Tune trial holds is on every node."""
    from components.tuning.plan import TRIAL_RESOURCES

    held = {{"cpu": "CPU", "gpu": "GPU"}.get(k, k) for k, v in TRIAL_RESOURCES.items() if v}
    assert held and held <= BUILTIN_RESOURCES, TRIAL_RESOURCES
    for path in INFRA.rglob("*"):
        if path.is_file() and path.suffix != ".json":
            text = path.read_text()
            assert "TRAIN_DRIVER" not in text and "RAY_OVERRIDE_RESOURCES" not in text, rel(path)
            assert path.name == "README.md" or "--resources" not in text, rel(path)
    for spec in kuberay_specs().values():
        for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
            assert "resources" not in group["rayStartParams"]
    launcher = one(INFRA / "ray-cluster-launcher.yaml")
    for name, node_type in launcher["available_node_types"].items():
        assert set(node_type["resources"]) <= BUILTIN_RESOURCES, name


def test_launcher_config_is_valid_for_ray():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = one(INFRA / "ray-cluster-launcher.yaml")
    validate_config(prepare_config(config))
    (head,) = [c for c in config["head_start_ray_commands"] if "ray start" in c]
    assert "--num-cpus=0" in head and config["available_node_types"]["head"]["resources"] == {
        "CPU": 0}
    assert all("RAY_AUTH_MODE=token" in c for key in ("head_start_ray_commands",
               "worker_start_ray_commands") for c in config[key] if "ray start" in c)


@pytest.mark.parametrize("name", ["RayCluster", "RayJob"])
def test_every_ray_pod_reaches_mlflow_and_the_shared_data(name):
    spec = kuberay_specs()[name]
    assert spec["authOptions"]["mode"] == "token"
    for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
        assert group["template"]["metadata"]["labels"]["app.kubernetes.io/part-of"] == "visiontune"
        pod = group["template"]["spec"]
        claims = {v["name"]: v["persistentVolumeClaim"]["claimName"]
                  for v in pod["volumes"] if "persistentVolumeClaim" in v}
        for c in pod["containers"]:
            env = {e["name"]: e.get("value") for e in c["env"]}
            assert env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
            assert env["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] == "0.2"
            mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
            assert claims[mounts[DATA_MOUNT]] == DATA_CLAIM
    assert one(INFRA / "kuberay/data-pvc.yaml")["spec"]["accessModes"] == ["ReadWriteMany"]


def test_rayjob_runs_the_raycluster_spec_and_a_valid_visiontune_run():
    from pipelines.compose import load_config

    specs = kuberay_specs()
    assert specs["RayJob"] == specs["RayCluster"]
    argv = shlex.split(one(INFRA / "kuberay/rayjob.yaml")["spec"]["entrypoint"])
    assert argv[:2] == ["visiontune", "run"]
    assert "visiontune" in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "scripts"]
    cfg = load_config(argv[2:], resolve=False)
    assert (cfg.ray.address, cfg.tracking.uri) == ("auto", "http://mlflow:5000")
    assert cfg.data.path.startswith(DATA_MOUNT + "/")
    assert cfg.ray.storage_path.startswith(DATA_MOUNT + "/")
    gpus = sum(g["minReplicas"] * int(c["resources"]["limits"].get("nvidia.com/gpu", 0))
               for g in specs["RayJob"]["workerGroupSpecs"] for c in g["template"]["spec"][
                   "containers"])
    assert cfg.train.use_gpu is True and cfg.train.num_workers <= gpus


def test_kubectl_commands_name_the_namespace():
    """Every kubectl command shown in infra/ and docs/cluster.md that reaches an object names the
    namespace; `kubectl apply` needs not (the files' objects carry it). A bare mention in prose
    (`kubectl port-forward`) is no command."""
    commands = 0
    for path in [*INFRA.rglob("*.yaml"), INFRA / "README.md", ROOT / "docs/cluster.md"]:
        for line in path.read_text().splitlines():
            line = line.lstrip("#").strip()
            for cmd in re.findall(r"(?:^|\$\(|`)kubectl ([^`)|]*)", line):
                if len(cmd.split()) < 2 or cmd.startswith(("apply ", "config ")):
                    continue
                commands += 1
                assert cmd.startswith(f"-n {NAMESPACE} "), f"{rel(path)}: kubectl {cmd}"
    assert commands >= 10
