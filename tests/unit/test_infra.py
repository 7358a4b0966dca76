"""infra/ definitions parse and agree with each other and with the project: one image name,
stock Ray nodes (no custom resources), shared storage on every pod, a RayJob entrypoint the
config loader accepts, the console script, MLflow servers that proxy artifacts. No network, no
docker, no Ray or MLflow started."""

from __future__ import annotations

import configparser
import json
import re
import shlex
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
INFRA = ROOT / "infra"
# The one name of the image built by infra/Dockerfile; change it here and in infra/ together.
IMAGE = "visiontune:latest"
MLFLOW_IMAGE = "visiontune-mlflow:latest"
# Resources every Ray node has without being asked for: a node definition that advertises
# anything else (a custom resource) would make the pipeline depend on a special `ray start`.
BUILTIN_RESOURCES = {"CPU", "GPU", "memory", "object_store_memory"}
# What Tune's trial slot was once called; it must not come back in any form.
OLD_SLOT = "TRAIN_DRIVER"
DATA_CLAIM, DATA_MOUNT = "visiontune-data", "/mnt/data"

YAML_FILES = sorted(p for ext in ("*.yaml", "*.yml") for p in INFRA.rglob(ext))
SHELL_SCRIPTS = sorted(INFRA.rglob("*.sh"))


def docs(path: Path) -> list:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def one(path: Path) -> dict:
    (doc,) = docs(path)
    return doc


def rel(p: Path) -> str:
    return str(p.relative_to(ROOT))


def console_scripts() -> dict[str, str]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]


def kuberay_specs() -> dict[str, dict]:
    """Every RayCluster spec in infra/kuberay: the RayCluster's and the RayJob's cluster."""
    cluster = one(INFRA / "kuberay/raycluster.yaml")
    job = one(INFRA / "kuberay/rayjob.yaml")
    return {"RayCluster": cluster["spec"], "RayJob": job["spec"]["rayClusterSpec"]}


def groups(spec: dict) -> list[dict]:
    return [spec["headGroupSpec"], *spec["workerGroupSpecs"]]


def ray_start_resources(value: str) -> dict:
    """KubeRay's rayStartParams.resources ('"{\\"X\\": 1}"', quoted for a shell) -> dict."""
    (arg,) = shlex.split(value)
    return json.loads(arg)


def cli_resources(command: str) -> dict:
    """The --resources JSON of a `ray start` command line ({} without one)."""
    toks = shlex.split(command.replace(";", " ; "))
    for i, tok in enumerate(toks):
        if tok.startswith("--resources="):
            return json.loads(tok.split("=", 1)[1])
        if tok == "--resources":
            return json.loads(toks[i + 1])
    return {}


def cli_option(command: str, name: str) -> str | None:
    """The value of `--name=value` / `--name value` in a command line, or None."""
    toks = shlex.split(command.replace(";", " ; "))
    for i, tok in enumerate(toks):
        if tok.startswith(f"--{name}="):
            return tok.split("=", 1)[1]
        if tok == f"--{name}" and i + 1 < len(toks):
            return toks[i + 1]
    return None


def custom(resources: dict) -> set[str]:
    return set(resources) - BUILTIN_RESOURCES


# --- every file parses ---------------------------------------------------------------------------


def test_infra_has_the_expected_files():
    expected = ["Dockerfile", "README.md", "kuberay/raycluster.yaml", "kuberay/rayjob.yaml",
                "kuberay/data-pvc.yaml", "ray-cluster-launcher.yaml", "mlflow/Dockerfile",
                "mlflow/docker-compose.yaml", "mlflow/docker-compose.auth.yaml",
                "mlflow/basic_auth.ini", "mlflow/k8s.yaml", "local/start-mlflow.sh",
                "local/start-ray-head.sh"]
    assert [f for f in expected if not (INFRA / f).is_file()] == []


@pytest.mark.parametrize("path", YAML_FILES, ids=rel)
def test_every_yaml_document_parses_to_a_mapping(path):
    documents = docs(path)
    assert documents, f"{rel(path)} holds no YAML document"
    assert all(isinstance(d, dict) for d in documents)


def test_readme_describes_every_infra_file():
    readme = (INFRA / "README.md").read_text()
    files = [p for p in INFRA.rglob("*") if p.is_file() and p.name != "README.md"]
    missing = [str(p.relative_to(INFRA)) for p in files if str(p.relative_to(INFRA)) not in readme]
    assert missing == []


# --- stock Ray nodes: no custom resources ---------------------------------------------------------


def walk(node):
    """Every mapping in a parsed YAML document, depth first."""
    if isinstance(node, dict):
        yield node
        for v in node.values():
            yield from walk(v)
    elif isinstance(node, list):
        for v in node:
            yield from walk(v)


def test_a_trial_holds_only_builtin_resources():
    """Why the nodes below need nothing special: what a Tune trial holds is on every node."""
    from components.tuning.plan import TRIAL_RESOURCES

    names = {"cpu": "CPU", "gpu": "GPU"}
    held = {names.get(k, k) for k, v in TRIAL_RESOURCES.items() if v}
    assert held and custom(dict.fromkeys(held)) == set(), TRIAL_RESOURCES


def test_no_file_in_infra_asks_for_a_custom_resource():
    for path in INFRA.rglob("*"):
        if not path.is_file():
            continue
        text = path.read_text()
        assert OLD_SLOT not in text, rel(path)
        assert "RAY_OVERRIDE_RESOURCES" not in text, rel(path)
        if path.name != "README.md":
            # `ray start --resources=...` (or KubeRay's rayStartParams.resources) exists only
            # to add custom resources; CPUs/GPUs have their own flags.
            assert "--resources" not in text, rel(path)


@pytest.mark.parametrize("path", YAML_FILES, ids=rel)
def test_no_yaml_node_definition_has_custom_resources(path):
    for doc in docs(path):
        for m in walk(doc):
            if isinstance(m.get("rayStartParams"), dict):
                assert "resources" not in m["rayStartParams"], rel(path)
            for name, node_type in (m.get("available_node_types") or {}).items():
                assert custom(node_type.get("resources", {})) == set(), f"{rel(path)}: {name}"


# --- one image, one console script ---------------------------------------------------------------


def test_console_script_is_visiontune_and_importable():
    import importlib

    scripts = console_scripts()
    assert "visiontune" in scripts
    module, func = scripts["visiontune"].split(":")
    assert callable(getattr(importlib.import_module(module), func))


def test_image_name_agrees_everywhere():
    dockerfile = (INFRA / "Dockerfile").read_text()
    assert f"-t {IMAGE} ." in dockerfile
    for name, spec in kuberay_specs().items():
        images = {c["image"] for g in groups(spec) for c in g["template"]["spec"]["containers"]}
        assert images == {IMAGE}, name
    assert one(INFRA / "ray-cluster-launcher.yaml")["docker"]["image"] == IMAGE
    assert IMAGE in (INFRA / "README.md").read_text()
    # Any other spelling of the image anywhere in infra/ (comments included) may only add a
    # registry in front of the same name and tag (e.g. ghcr.io/your-org/visiontune:latest).
    name = re.compile(r"(?<![\w.-])(?:[\w.-]+/)*visiontune:[\w.-]+")
    for path in INFRA.rglob("*"):
        if path.is_file():
            for ref in name.findall(path.read_text()):
                assert ref.split("/")[-1] == IMAGE, f"{rel(path)}: {ref}"


def test_mlflow_image_name_agrees():
    compose = one(INFRA / "mlflow/docker-compose.yaml")
    assert compose["services"]["mlflow"]["image"] == MLFLOW_IMAGE
    deployments = [d for d in docs(INFRA / "mlflow/k8s.yaml") if d["kind"] == "Deployment"]
    (mlflow,) = [d for d in deployments if d["metadata"]["name"] == "mlflow"]
    assert mlflow["spec"]["template"]["spec"]["containers"][0]["image"] == MLFLOW_IMAGE
    assert f"-t {MLFLOW_IMAGE} infra/mlflow" in (INFRA / "mlflow/Dockerfile").read_text()


# --- the Dockerfiles -----------------------------------------------------------------------------


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    lines, current = [], ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not current and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        current += " " + line.rstrip("\\").strip() if current else line.rstrip("\\").strip()
        if not line.endswith("\\"):
            lines.append(current)
            current = ""
    return [(ln.split(None, 1)[0].upper(), ln.split(None, 1)[1] if " " in ln else "")
            for ln in lines]


def test_dockerfile_builds_the_project_on_a_cuda_runtime():
    ins = dockerfile_instructions(INFRA / "Dockerfile")
    (base,) = [a for i, a in ins if i == "FROM"]
    assert re.fullmatch(r"nvidia/cuda:[\d.]+-(cudnn-)?runtime-ubuntu[\d.]+", base), base
    assert ("WORKDIR", "/app") in ins
    runs = [a for i, a in ins if i == "RUN"]
    assert any(re.search(r"\bpip install (--?[\w-]+ )*\.(\s|$)", r) for r in runs), \
        "the image must `pip install .` the project"
    assert any("python3.11" in r for r in runs)
    # What `pip install .` needs: pyproject, its readme, the packages, and conf/ for the loader.
    copied = " ".join(a for i, a in ins if i == "COPY")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    needed = ["pyproject.toml", project["project"]["readme"], "components/", "pipelines/", "conf/"]
    assert [n for n in needed if n not in copied] == []
    assert all((ROOT / n).exists() for n in needed)
    envs = " ".join(a for i, a in ins if i == "ENV")
    assert "VISIONTUNE_CONF_DIR=/app/conf" in envs
    assert "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S=0.2" in envs
    (cmd,) = [a for i, a in ins if i == "CMD"]
    assert json.loads(cmd) == ["visiontune", "--help"]
    assert json.loads(cmd)[0] in console_scripts()


def test_ray_version_of_the_image_matches_kuberay():
    ins = dockerfile_instructions(INFRA / "Dockerfile")
    (version,) = [a.split("=", 1)[1] for i, a in ins if i == "ARG" and a.startswith("RAY_VERSION=")]
    for name, spec in kuberay_specs().items():
        assert spec["rayVersion"] == version, name


def test_mlflow_dockerfile_installs_server_drivers():
    ins = dockerfile_instructions(INFRA / "mlflow/Dockerfile")
    assert [a for i, a in ins if i == "FROM"] == ["python:3.11-slim"]
    runs = " ".join(a for i, a in ins if i == "RUN")
    for package in ("mlflow[auth]", "psycopg2-binary", "boto3"):
        assert package in runs


# --- KubeRay -------------------------------------------------------------------------------------


def test_raycluster_has_a_cpu_head_and_a_gpu_worker_group():
    cluster = one(INFRA / "kuberay/raycluster.yaml")
    assert (cluster["apiVersion"], cluster["kind"]) == ("ray.io/v1", "RayCluster")
    spec = cluster["spec"]
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["dashboard-host"] == "0.0.0.0"
    assert "num-cpus" in head["rayStartParams"]
    (head_container,) = head["template"]["spec"]["containers"]
    assert 8265 in {p["containerPort"] for p in head_container["ports"]}
    assert "nvidia.com/gpu" not in head_container["resources"].get("limits", {})
    gpu_groups = [g for g in spec["workerGroupSpecs"]
                  if any(int(c["resources"]["limits"].get("nvidia.com/gpu", 0)) >= 1
                         for c in g["template"]["spec"]["containers"])]
    assert gpu_groups, "no worker group requests nvidia.com/gpu"
    for g in spec["workerGroupSpecs"]:
        assert g["groupName"]
        assert 0 <= g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]
    assert spec["authOptions"]["mode"] == "token"


@pytest.mark.parametrize("name", ["RayCluster", "RayJob"])
def test_every_kuberay_node_is_stock_ray_with_env_and_shared_data(name):
    for group in groups(kuberay_specs()[name]):
        # A stock `ray start`: no custom resources (KubeRay's rayStartParams.resources is only
        # for those; CPUs/GPUs come from num-cpus and the container limits).
        params = group["rayStartParams"]
        assert "resources" not in params, \
            f"{name}: custom resources {ray_start_resources(params['resources'])}"
        pod = group["template"]["spec"]
        claims = {v["name"]: v["persistentVolumeClaim"]["claimName"]
                  for v in pod["volumes"] if "persistentVolumeClaim" in v}
        for c in pod["containers"]:
            env = {e["name"]: e.get("value") for e in c["env"]}
            assert "RAY_OVERRIDE_RESOURCES" not in env
            assert env["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] == "0.2"
            assert env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
            mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
            assert claims[mounts[DATA_MOUNT]] == DATA_CLAIM


def test_data_pvc_is_shared_by_all_pods():
    pvc = one(INFRA / "kuberay/data-pvc.yaml")
    assert (pvc["kind"], pvc["metadata"]["name"]) == ("PersistentVolumeClaim", DATA_CLAIM)
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]


def test_rayjob_runs_the_raycluster_spec():
    job = one(INFRA / "kuberay/rayjob.yaml")
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    assert job["spec"]["shutdownAfterJobFinishes"] is True
    specs = kuberay_specs()
    assert specs["RayJob"] == specs["RayCluster"]


def test_rayjob_entrypoint_is_a_valid_visiontune_run():
    from pipelines.config import load_config

    entrypoint = one(INFRA / "kuberay/rayjob.yaml")["spec"]["entrypoint"]
    argv = shlex.split(entrypoint)
    assert argv[:2] == ["visiontune", "run"]
    assert argv[0] in console_scripts()
    overrides = argv[2:]
    assert overrides and all("=" in o and not o.startswith("-") for o in overrides)
    cfg = load_config(overrides, resolve=False)
    assert cfg.ray.address == "auto"
    assert cfg.tracking.uri == "http://mlflow:5000"
    # Data and checkpoints on the volume every pod mounts.
    assert cfg.data.path.startswith(DATA_MOUNT + "/")
    assert cfg.ray.storage_path.startswith(DATA_MOUNT + "/")
    assert cfg.train.use_gpu is True
    # Each trial's workers fit the GPU workers present at start.
    gpus = sum(g["minReplicas"] * int(c["resources"]["limits"].get("nvidia.com/gpu", 0))
               for g in kuberay_specs()["RayJob"]["workerGroupSpecs"]
               for c in g["template"]["spec"]["containers"])
    assert cfg.train.num_workers <= gpus


# --- Ray cluster launcher ------------------------------------------------------------------------


def test_launcher_config_is_valid_for_ray():
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(one(INFRA / "ray-cluster-launcher.yaml")))


def test_launcher_starts_stock_ray_nodes():
    cfg = one(INFRA / "ray-cluster-launcher.yaml")
    assert cfg["docker"]["image"] == IMAGE
    assert "-e RAY_TRAIN_HEALTH_CHECK_INTERVAL_S=0.2" in cfg["docker"]["run_options"]
    assert not any("RAY_OVERRIDE_RESOURCES" in o for o in cfg["docker"]["run_options"])
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [c for c in cfg[key] if "ray start" in c]
        assert starts, key
        for c in starts:
            assert cli_resources(c) == {}, f"custom resources in {c!r}"
            assert "RAY_OVERRIDE_RESOURCES" not in c
            assert "RAY_AUTH_MODE=token" in c
    (head_start,) = [c for c in cfg["head_start_ray_commands"] if "ray start" in c]
    assert "--head" in head_start and "--dashboard-host=0.0.0.0" in head_start
    # The autoscaler's view of each node type: built-in resources only, and the head's CPU
    # count agrees with what its `ray start` advertises.
    for name, node_type in cfg["available_node_types"].items():
        assert custom(node_type["resources"]) == set(), name
    head_type = cfg["available_node_types"][cfg["head_node_type"]]
    assert float(head_type["resources"]["CPU"]) == float(cli_option(head_start, "num-cpus"))
    assert "~/.ray/auth_token" in cfg["file_mounts"]


# --- MLflow --------------------------------------------------------------------------------------


def command_line(command) -> str:
    return command if isinstance(command, str) else " ".join(map(str, command))


@pytest.mark.parametrize("compose_file", ["docker-compose.yaml", "docker-compose.auth.yaml"])
def test_compose_mlflow_serves_artifacts_from_postgres_and_s3(compose_file):
    mlflow = one(INFRA / "mlflow" / compose_file)["services"]["mlflow"]
    cmd = command_line(mlflow["command"])
    assert cmd.startswith("mlflow server")
    assert "--serve-artifacts" in cmd
    assert re.search(r"--backend-store-uri postgresql://\S+@postgres:5432/mlflow", cmd)
    assert re.search(r"--artifacts-destination s3://mlflow\b", cmd)
    assert "--host 0.0.0.0" in cmd and "--port 5000" in cmd
    if compose_file.endswith("auth.yaml"):
        assert "--app-name basic-auth" in cmd
        assert mlflow["environment"]["MLFLOW_AUTH_CONFIG_PATH"] == "/etc/mlflow/basic_auth.ini"
        assert any(v.startswith("./basic_auth.ini:/etc/mlflow/basic_auth.ini")
                   for v in mlflow["volumes"])


def test_compose_services_are_healthchecked_and_ordered():
    services = one(INFRA / "mlflow/docker-compose.yaml")["services"]
    assert services["postgres"]["image"] == "postgres:16"
    assert services["minio"]["image"].startswith("minio/minio")
    assert services["minio-init"]["image"].startswith("minio/mc")
    assert "mc mb --ignore-existing local/mlflow" in command_line(services["minio-init"]["command"])
    for name in ("postgres", "minio", "mlflow"):
        assert services[name]["healthcheck"]["test"], name
    mlflow = services["mlflow"]
    assert mlflow["depends_on"] == {"postgres": {"condition": "service_healthy"},
                                    "minio-init": {"condition": "service_completed_successfully"}}
    assert mlflow["environment"]["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000"
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= set(mlflow["environment"])
    assert "5000:5000" in mlflow["ports"]
    assert (INFRA / "mlflow" / mlflow["build"]["context"] / mlflow["build"]["dockerfile"]).is_file()


def test_k8s_mlflow_service_deployment_and_secrets_agree():
    documents = docs(INFRA / "mlflow/k8s.yaml")
    by_kind_name = {(d["kind"], d["metadata"]["name"]): d for d in documents}
    assert {("Secret", "mlflow-secrets"), ("Service", "mlflow"), ("Deployment", "mlflow"),
            ("Service", "postgres"), ("StatefulSet", "postgres")} <= set(by_kind_name)
    secrets = {name: set(d.get("stringData", {})) | set(d.get("data", {}))
               for (kind, name), d in by_kind_name.items() if kind == "Secret"}
    # Every secretKeyRef names a key of a Secret defined here.
    pods = [d["spec"]["template"]["spec"] for d in documents if "template" in d.get("spec", {})]
    for pod in pods:
        for c in pod.get("initContainers", []) + pod["containers"]:
            for e in c.get("env", []):
                ref = e.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    assert ref["key"] in secrets[ref["name"]], ref
    # Every Service selects the pods of a workload in this file.
    for (kind, name), svc in by_kind_name.items():
        if kind == "Service":
            selected = [d for d in documents if d["kind"] in ("Deployment", "StatefulSet")
                        and svc["spec"]["selector"].items()
                        <= d["spec"]["template"]["metadata"]["labels"].items()]
            assert selected, name
    service = by_kind_name[("Service", "mlflow")]
    assert [p["port"] for p in service["spec"]["ports"]] == [5000]
    (container,) = by_kind_name[("Deployment", "mlflow")]["spec"]["template"]["spec"]["containers"]
    cmd = command_line(container["command"] + container["args"])
    assert cmd.startswith("mlflow server")
    assert "--serve-artifacts" in cmd and "--host 0.0.0.0" in cmd and "--port 5000" in cmd
    assert re.search(r"--backend-store-uri postgresql://\S+@postgres:5432/mlflow", cmd)
    env = {e["name"] for e in container["env"]}
    assert {"MLFLOW_S3_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= env
    assert container["readinessProbe"]["httpGet"] == {"path": "/health", "port": 5000}


def test_basic_auth_ini_and_its_documentation():
    ini = configparser.ConfigParser()
    ini.read(INFRA / "mlflow/basic_auth.ini")
    section = ini["mlflow"]
    assert section["default_permission"] in {"READ", "USE", "EDIT", "MANAGE", "NO_PERMISSIONS"}
    assert section["database_uri"].startswith(("sqlite:///", "postgresql://"))
    assert section["admin_username"]
    assert "CHANGE" in section["admin_password"]   # a placeholder, clearly marked
    assert section["authorization_function"] == \
        "mlflow.server.auth:authenticate_request_basic_auth"
    readme = (INFRA / "README.md").read_text()
    for needle in ("--app-name basic-auth", "MLFLOW_AUTH_CONFIG_PATH", "MLFLOW_TRACKING_USERNAME",
                   "MLFLOW_TRACKING_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY"):
        assert needle in readme, needle


# --- local scripts -------------------------------------------------------------------------------


@pytest.mark.parametrize("script", SHELL_SCRIPTS, ids=rel)
def test_shell_scripts_are_valid_strict_bash(script):
    bash = shutil.which("bash")
    assert bash
    result = subprocess.run([bash, "-n", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    text = script.read_text()
    assert text.startswith("#!/usr/bin/env bash\n")
    assert "set -euo pipefail" in text
    # An unknown command is a usage error; nothing is started.
    result = subprocess.run([bash, str(script), "no-such-command"], capture_output=True,
                            text=True, timeout=10)
    assert result.returncode == 2 and "usage:" in result.stderr


def test_local_mlflow_script_serves_artifacts_in_its_own_process_group():
    text = (INFRA / "local/start-mlflow.sh").read_text()
    assert "setsid" in text and "PID_FILE" in text
    assert 'kill -TERM -- "-$pgid"' in text          # the whole group, not just the server
    assert "sqlite:///${BASE_DIR}/mlflow-server.db" in text
    assert "--serve-artifacts" in text and "--artifacts-destination" in text


def test_local_ray_head_script_is_a_stock_ray_start():
    text = (INFRA / "local/start-ray-head.sh").read_text()
    assert "ray start --head" in text
    assert "--resources" not in text and "RAY_OVERRIDE_RESOURCES" not in text
    assert "--dashboard-host=127.0.0.1" in text and "--include-dashboard=true" in text
    assert "stop) ray stop" in text
    assert "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S" in text
