"""infra/ definitions parse and agree with each other and with the project: one image name,
stock Ray nodes (no custom resources), shared storage on every pod, a RayJob entrypoint the
config loader accepts, the console script, MLflow servers that proxy artifacts. Closed by
default: ports published on loopback only, MLflow auth always on, credentials required with no
default, NetworkPolicies, pinned image tags and lock files. No network, no docker, no Ray or
MLflow started."""

from __future__ import annotations

import configparser
import ipaddress
import json
import os
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
IMAGE = "visiontune:0.1.0"
MLFLOW_IMAGE = "visiontune-mlflow:0.1.0"
# Resources every Ray node has without being asked for: a node definition that advertises
# anything else (a custom resource) would make the pipeline depend on a special `ray start`.
BUILTIN_RESOURCES = {"CPU", "GPU", "memory", "object_store_memory"}
# What Tune's trial slot was once called; it must not come back in any form.
OLD_SLOT = "TRAIN_DRIVER"
DATA_CLAIM, DATA_MOUNT = "visiontune-data", "/mnt/data"

YAML_FILES = sorted(p for ext in ("*.yaml", "*.yml") for p in INFRA.rglob(ext))
COMPOSE_FILES = [p for p in YAML_FILES if "compose" in p.name]
DOCKERFILES = sorted(INFRA.rglob("Dockerfile*"))
LOCK = INFRA / "requirements-lock.txt"
MLFLOW_LOCK = INFRA / "mlflow/requirements-lock.txt"
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
    expected = ["Dockerfile", "README.md", "requirements-lock.txt", "kuberay/raycluster.yaml",
                "kuberay/rayjob.yaml", "kuberay/data-pvc.yaml", "ray-cluster-launcher.yaml",
                "mlflow/Dockerfile", "mlflow/requirements-lock.txt", "mlflow/docker-compose.yaml",
                "mlflow/basic_auth.ini", "mlflow/k8s.yaml", "local/start-mlflow.sh",
                "local/start-ray-head.sh"]
    assert [f for f in expected if not (INFRA / f).is_file()] == []
    # Auth is part of the compose file, not an overlay that one may forget to add.
    assert COMPOSE_FILES == [INFRA / "mlflow/docker-compose.yaml"]
    mentions = [rel(p) for p in [*INFRA.rglob("*"), Path(__file__)]
                if p.is_file() and "docker-compose" + ".auth" in p.read_text()]
    assert mentions == []


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


def dockerfile_args(path: Path) -> dict[str, str]:
    ins = dockerfile_instructions(path)
    return dict(a.split("=", 1) for i, a in ins if i == "ARG" and "=" in a)


def dockerfile_env(path: Path) -> dict[str, str]:
    return dict(tok.split("=", 1) for i, a in dockerfile_instructions(path) if i == "ENV"
                for tok in shlex.split(a))


def pip_installs(path: Path) -> list[list[str]]:
    """The arguments after `pip install` of every pip command in the RUN lines, with the ARGs'
    defaults substituted (`RUN a && pip install -c lock x==1` -> [["-c", "lock", "x==1"]])."""
    args = dockerfile_args(path)
    found = []
    for ins, line in dockerfile_instructions(path):
        if ins != "RUN":
            continue
        line = re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), m.group(0)), line)
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        command: list[str] = []
        for tok in [*lexer, ";"]:
            if tok in {"&&", "||", ";", "|"}:
                if command[:2] == ["pip", "install"]:
                    found.append(command[2:])
                command = []
            else:
                command.append(tok)
    return found


PIP_VALUE_OPTIONS = {"-c", "-r", "-i", "--extra-index-url", "-f"}
PIP_ALIASES = {"--constraint": "-c", "--requirement": "-r", "--index-url": "-i",
               "--find-links": "-f"}


def pip_parts(argv: list[str]) -> tuple[dict[str, list[str]], list[str]]:
    """({option: [values]}, [requirement or path arguments]) of one `pip install`."""
    options: dict[str, list[str]] = {}
    positional, it = [], iter(argv)
    for tok in it:
        tok = PIP_ALIASES.get(tok, tok)
        if tok in PIP_VALUE_OPTIONS:
            options.setdefault(tok, []).append(next(it))
        elif tok.startswith("-"):
            options.setdefault(tok, [])
        else:
            positional.append(tok)
    return options, positional


def read_lock(path: Path) -> dict[str, str]:
    """{normalized name: version} of a lock file; every line a comment or name==version."""
    pins = {}
    for line in path.read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        m = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([\w.+!-]+)", line.strip())
        assert m, f"{rel(path)}: not a name==version pin: {line!r}"
        name = re.sub(r"[-_.]+", "-", m.group(1)).lower()
        assert name not in pins, f"{rel(path)}: {name} twice"
        pins[name] = m.group(2)
    return pins


def test_dockerfile_builds_the_project_on_a_cuda_runtime():
    ins = dockerfile_instructions(INFRA / "Dockerfile")
    (base,) = [a for i, a in ins if i == "FROM"]
    assert re.fullmatch(r"nvidia/cuda:\d+\.\d+\.\d+-(cudnn-)?runtime-ubuntu[\d.]+", base), base
    assert ("WORKDIR", "/app") in ins
    runs = [a for i, a in ins if i == "RUN"]
    assert any(pip_parts(argv)[1] == ["."] for argv in pip_installs(INFRA / "Dockerfile")), \
        "the image must `pip install .` the project"
    assert any("python3.11" in r for r in runs)
    # What `pip install .` needs: pyproject, its readme, the packages, and conf/ for the loader.
    copied = " ".join(a for i, a in ins if i == "COPY")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    needed = ["pyproject.toml", project["project"]["readme"], "components/", "pipelines/", "conf/"]
    assert [n for n in needed if n not in copied] == []
    assert all((ROOT / n).exists() for n in needed)
    env = dockerfile_env(INFRA / "Dockerfile")
    assert env["VISIONTUNE_CONF_DIR"] == "/app/conf"
    assert env["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] == "0.2"
    (cmd,) = [a for i, a in ins if i == "CMD"]
    assert json.loads(cmd) == ["visiontune", "--help"]
    assert json.loads(cmd)[0] in console_scripts()


def test_ray_version_of_the_image_matches_kuberay():
    version = dockerfile_args(INFRA / "Dockerfile")["RAY_VERSION"]
    for name, spec in kuberay_specs().items():
        assert spec["rayVersion"] == version, name


def test_dockerfile_installs_from_the_lock_and_skips_the_albumentations_check():
    path = INFRA / "Dockerfile"
    # albumentations asks PyPI for a newer version on import otherwise (every worker, every job).
    assert dockerfile_env(path)["NO_ALBUMENTATIONS_UPDATE"] == "1"
    copies = [a.split() for i, a in dockerfile_instructions(path) if i == "COPY"]
    assert ["infra/requirements-lock.txt", "infra/requirements-lock.txt"] in copies
    installs = pip_installs(path)
    assert installs
    for argv in installs:
        options, requirements = pip_parts(argv)
        # Every install is constrained by the lock, or pins each thing it names (pip itself).
        assert options.get("-c") == ["infra/requirements-lock.txt"] or \
            (requirements and all("==" in r for r in requirements) and "-r" not in options), argv
    # The dependency install: pyproject's dependencies plus Ray at the image's Ray version.
    ray = f"ray[default,train,tune]=={dockerfile_args(path)['RAY_VERSION']}"
    assert any(ray in pip_parts(argv)[1] and pip_parts(argv)[0].get("-c") for argv in installs)
    # The project is built with the locked setuptools, not one fetched at build time.
    (project,) = [argv for argv in installs if pip_parts(argv)[1] == ["."]]
    assert "--no-build-isolation" in project


def test_lock_pins_what_the_image_runs_and_satisfies_pyproject():
    requirements = pytest.importorskip("packaging.requirements")
    pins = read_lock(LOCK)
    for name in ("ray", "torch", "torchvision", "mlflow", "albumentations", "pillow", "boto3",
                 "setuptools"):
        assert name in pins, name
    assert "visiontune" not in pins
    assert pins["ray"] == dockerfile_args(INFRA / "Dockerfile")["RAY_VERSION"]
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for dep in project["dependencies"]:
        req = requirements.Requirement(dep)
        name = re.sub(r"[-_.]+", "-", req.name).lower()
        assert name in pins, f"{dep}: not in {rel(LOCK)}"
        assert req.specifier.contains(pins[name], prereleases=True), f"{dep} vs {pins[name]}"


def test_mlflow_dockerfile_installs_pinned_server_drivers():
    path = INFRA / "mlflow/Dockerfile"
    ins = dockerfile_instructions(path)
    assert [a for i, a in ins if i == "FROM"] == ["python:3.11.13-slim-bookworm"]
    assert ["requirements-lock.txt", "/tmp/requirements-lock.txt"] in \
        [a.split() for i, a in ins if i == "COPY"]
    (argv,) = pip_installs(path)
    options, requirements = pip_parts(argv)
    assert options["-c"] == ["/tmp/requirements-lock.txt"]
    args = dockerfile_args(path)
    assert requirements == [f"mlflow[auth]=={args['MLFLOW_VERSION']}",
                            f"psycopg2-binary=={args['PSYCOPG2_VERSION']}",
                            f"boto3=={args['BOTO3_VERSION']}"]
    # The server's own lock: the pins above, the auth extra, and the versions visiontune's
    # clients run (the main lock) for every package the two share.
    server, main = read_lock(MLFLOW_LOCK), read_lock(LOCK)
    assert server["mlflow"] == args["MLFLOW_VERSION"] == main["mlflow"]
    assert server["psycopg2-binary"] == args["PSYCOPG2_VERSION"]
    assert server["boto3"] == args["BOTO3_VERSION"]
    assert "flask-wtf" in server
    assert {n: (v, main[n]) for n, v in server.items() if n in main and main[n] != v} == {}
    # Closed by default even when run alone: the default command starts the basic-auth app.
    (cmd,) = [a for i, a in ins if i == "CMD"]
    assert command_line(json.loads(cmd)).startswith("mlflow server --app-name basic-auth")


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


def compose_services() -> dict:
    return one(INFRA / "mlflow/docker-compose.yaml")["services"]


def compose_env(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(e.split("=", 1) if "=" in e else (e, None) for e in env)
    return env


def test_compose_mlflow_serves_artifacts_from_postgres_and_s3():
    mlflow = compose_services()["mlflow"]
    # `${POSTGRES_PASSWORD:?message}` stands for the password.
    cmd = re.sub(r"\$\{[^}]*\}", "PASSWORD", command_line(mlflow["command"]))
    assert cmd.startswith("mlflow server")
    assert "--serve-artifacts" in cmd
    assert re.search(r"--backend-store-uri postgresql://\S+@postgres:5432/mlflow", cmd)
    assert re.search(r"--artifacts-destination s3://mlflow\b", cmd)
    assert "--host 0.0.0.0" in cmd and "--port 5000" in cmd


def test_compose_services_are_healthchecked_and_ordered():
    services = compose_services()
    assert services["postgres"]["image"].startswith("postgres:")
    assert services["minio"]["image"].startswith("minio/minio:")
    assert services["minio-init"]["image"].startswith("minio/mc:")
    assert "mc mb --ignore-existing local/mlflow" in command_line(services["minio-init"]["command"])
    for name in ("postgres", "minio", "mlflow"):
        assert services[name]["healthcheck"]["test"], name
    mlflow = services["mlflow"]
    assert mlflow["depends_on"] == {"postgres": {"condition": "service_healthy"},
                                    "minio-init": {"condition": "service_completed_successfully"}}
    assert mlflow["environment"]["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000"
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= set(mlflow["environment"])
    assert mlflow["ports"] == ["127.0.0.1:5000:5000"]
    assert (INFRA / "mlflow" / mlflow["build"]["context"] / mlflow["build"]["dockerfile"]).is_file()


# Closed by default (1): nothing published beyond the host's loopback.


def interpolate_defaults(value: str) -> str:
    """Compose's `${VAR:-default}` / `${VAR-default}` replaced by the default; any other
    reference stays (and so is no IP address)."""
    return re.sub(r"\$\{\w+:?-([^}]*)\}", r"\1", value)


def published_host_ip(port) -> str | None:
    """The host address a compose `ports` entry binds, or None when it binds every interface
    (a bare port, HOST:CONTAINER, or the long syntax without host_ip)."""
    if isinstance(port, dict):
        return port.get("host_ip")
    spec = interpolate_defaults(str(port)).split("/")[0]
    if spec.startswith("["):                       # [IPv6]:HOST:CONTAINER
        return spec[1:].split("]", 1)[0]
    parts = spec.rsplit(":", 2)
    return parts[0] if len(parts) == 3 else None


def binds_loopback_only(port) -> bool:
    ip = published_host_ip(port)
    if ip is None:
        return False
    try:
        return ipaddress.ip_address(ip).is_loopback
    except ValueError:
        return False


@pytest.mark.parametrize("port", [
    "5000:5000", "5000", 5000, "0.0.0.0:5000:5000", "[::]:5000:5000", ":::5000:5000",
    "10.0.0.5:5000:5000", "${HOST_IP}:5000:5000", {"target": 5000, "published": 5000},
    {"target": 5000, "published": 5000, "host_ip": "0.0.0.0"}, {"target": 5000},
])
def test_port_check_rejects_ports_open_beyond_loopback(port):
    assert not binds_loopback_only(port)


@pytest.mark.parametrize("port", [
    "127.0.0.1:5000:5000", "127.0.0.1:9001:9001/tcp", "[::1]:5000:5000", "::1:5000:5000",
    "${BIND:-127.0.0.1}:5000:5000", {"target": 5000, "published": 5000, "host_ip": "127.0.0.1"},
])
def test_port_check_accepts_loopback_ports(port):
    assert binds_loopback_only(port)


@pytest.mark.parametrize("path", COMPOSE_FILES, ids=rel)
def test_compose_publishes_ports_on_loopback_only(path):
    for name, service in one(path)["services"].items():
        assert service.get("network_mode") != "host", name
        for port in service.get("ports", []):
            assert binds_loopback_only(port), f"{rel(path)}: {name} publishes {port!r}"
    services = one(path)["services"]
    # The stores are never published, not even on loopback.
    assert "ports" not in services["postgres"]
    assert all(not str(p).endswith(":9000") for p in services["minio"].get("ports", []))


# Closed by default (2): auth on, credentials from the environment only, no defaults.

# Variables that hold a credential; each must be `${VAR:?message}` wherever compose reads it.
COMPOSE_CREDENTIALS = {"POSTGRES_PASSWORD", "MINIO_ROOT_USER", "MINIO_ROOT_PASSWORD",
                       "MLFLOW_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY"}
# Container variables that receive a credential.
SECRET_ENV = {"POSTGRES_PASSWORD", "MINIO_ROOT_USER", "MINIO_ROOT_PASSWORD", "AWS_ACCESS_KEY_ID",
              "AWS_SECRET_ACCESS_KEY", "MLFLOW_AUTH_ADMIN_PASSWORD",
              "MLFLOW_FLASK_SERVER_SECRET_KEY"}
# `$$` (a literal `$` for the container's shell), `${NAME<modifier>}` or `$NAME`.
COMPOSE_REF = re.compile(r"\$\$|\$\{(\w+)([^}]*)\}|\$(\w+)")
REQUIRED = re.compile(r"\$\{(\w+):\?[^}]+\}")


def strings(node):
    """Every string (keys included) of a parsed YAML document."""
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for k, v in node.items():
            yield from strings(k)
            yield from strings(v)
    elif isinstance(node, list):
        for v in node:
            yield from strings(v)


@pytest.mark.parametrize("path", COMPOSE_FILES, ids=rel)
def test_compose_credentials_are_required_with_no_default(path):
    doc = one(path)
    seen = set()
    for text in strings(doc):
        for m in COMPOSE_REF.finditer(text):
            name = m.group(1) or m.group(3)
            if name in COMPOSE_CREDENTIALS:
                seen.add(name)
                # `${VAR:?message}` only: not `$VAR`, `${VAR}`, `${VAR:-default}`, `${VAR?}`.
                assert m.group(1) and re.fullmatch(r":\?.+", m.group(2)), \
                    f"{rel(path)}: {m.group(0)!r} lets compose start without {name}"
    assert seen == COMPOSE_CREDENTIALS
    for name, service in doc["services"].items():
        for key, value in compose_env(service).items():
            if key in SECRET_ENV:
                m = REQUIRED.fullmatch(str(value))
                assert m and m.group(1) in COMPOSE_CREDENTIALS, f"{name}: {key}={value!r}"


def test_compose_mlflow_runs_basic_auth():
    services = one(INFRA / "mlflow/docker-compose.yaml")
    mlflow = services["services"]["mlflow"]
    cmd = command_line(mlflow["command"])
    assert cmd.startswith("mlflow server --app-name basic-auth ")
    env = compose_env(mlflow)
    assert REQUIRED.fullmatch(env["MLFLOW_AUTH_ADMIN_PASSWORD"]).group(1) == "MLFLOW_ADMIN_PASSWORD"
    assert REQUIRED.fullmatch(env["MLFLOW_FLASK_SERVER_SECRET_KEY"])
    config = env["MLFLOW_AUTH_CONFIG_PATH"]
    assert f"./basic_auth.ini:{config}:ro" in mlflow["volumes"]
    # The user store lives on a named volume (it survives `docker compose down`).
    ini = configparser.ConfigParser()
    ini.read(INFRA / "mlflow/basic_auth.ini")
    store = ini["mlflow"]["database_uri"]
    assert store.startswith("sqlite:////")
    store_dir = str(Path(store.removeprefix("sqlite:///")).parent)
    mounts = dict(v.split(":")[:2][::-1] for v in mlflow["volumes"])
    assert mounts[store_dir] in services["volumes"]


# Kubernetes


def k8s_documents() -> list[dict]:
    return docs(INFRA / "mlflow/k8s.yaml")


def k8s_by_kind_name() -> dict[tuple[str, str], dict]:
    return {(d["kind"], d["metadata"]["name"]): d for d in k8s_documents()}


def mlflow_pod() -> dict:
    return k8s_by_kind_name()[("Deployment", "mlflow")]["spec"]["template"]["spec"]


def env_of(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def test_k8s_mlflow_service_deployment_and_secrets_agree():
    documents = k8s_documents()
    by_kind_name = k8s_by_kind_name()
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
    # Every Service selects the pods of a workload in this file, inside the cluster only.
    for (kind, name), svc in by_kind_name.items():
        if kind == "Service":
            assert svc["spec"].get("type", "ClusterIP") == "ClusterIP", name
            selected = [d for d in documents if d["kind"] in ("Deployment", "StatefulSet")
                        and svc["spec"]["selector"].items()
                        <= d["spec"]["template"]["metadata"]["labels"].items()]
            assert selected, name
    service = by_kind_name[("Service", "mlflow")]
    assert [p["port"] for p in service["spec"]["ports"]] == [5000]
    (container,) = mlflow_pod()["containers"]
    cmd = command_line(container["command"] + container["args"])
    assert cmd.startswith("mlflow server")
    assert "--serve-artifacts" in cmd and "--host 0.0.0.0" in cmd and "--port 5000" in cmd
    assert re.search(r"--backend-store-uri postgresql://\S+@postgres:5432/mlflow", cmd)
    env = set(env_of(container))
    assert {"MLFLOW_S3_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= env
    assert container["readinessProbe"]["httpGet"] == {"path": "/health", "port": 5000}


def test_k8s_mlflow_runs_basic_auth_from_the_secret():
    by_kind_name = k8s_by_kind_name()
    pod = mlflow_pod()
    (container,) = pod["containers"]
    cmd = command_line(container["command"] + container["args"])
    assert cmd.startswith("mlflow server --app-name basic-auth ")
    env = env_of(container)
    for name in ("MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY"):
        ref = env[name]["valueFrom"]["secretKeyRef"]
        assert ref["name"] == "mlflow-secrets" and not ref.get("optional"), name
    # basic_auth.ini from the ConfigMap, mounted where MLFLOW_AUTH_CONFIG_PATH points.
    config = Path(env["MLFLOW_AUTH_CONFIG_PATH"]["value"])
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: volumes[m["name"]] for m in container["volumeMounts"]}
    configmap = mounts[str(config.parent)]["configMap"]["name"]
    text = by_kind_name[("ConfigMap", configmap)]["data"][config.name]
    # The ConfigMap is basic_auth.ini: the same settings (comments aside).
    in_k8s, in_file = configparser.ConfigParser(), configparser.ConfigParser()
    in_k8s.read_string(text)
    in_file.read(INFRA / "mlflow/basic_auth.ini")
    assert dict(in_k8s["mlflow"]) == dict(in_file["mlflow"])
    # The SQLite user store is on a claim defined here, so it outlives the pod.
    store = in_k8s["mlflow"]["database_uri"]
    if store.startswith("sqlite:///"):
        claim = mounts[str(Path(store.removeprefix("sqlite:///")).parent)]
        assert ("PersistentVolumeClaim", claim["persistentVolumeClaim"]["claimName"]) \
            in by_kind_name
    assert pod["securityContext"]["runAsNonRoot"] is True


def test_k8s_secret_holds_placeholders_the_mlflow_pod_refuses():
    secret = k8s_by_kind_name()[("Secret", "mlflow-secrets")]["stringData"]
    values = {k: v for k, v in secret.items() if k != "POSTGRES_USER"}
    assert values and all(v.startswith("CHANGE-ME") for v in values.values()), values
    (check,) = [c for c in mlflow_pod()["initContainers"]
                if c["name"] == "refuse-placeholder-secrets"]
    checked = {name for name, e in env_of(check).items()
               if e.get("valueFrom", {}).get("secretKeyRef", {}).get("name") == "mlflow-secrets"}
    assert checked == set(values)
    script = command_line(check["command"] + check["args"])
    assert "$(" not in script          # Kubernetes would expand $(VAR) itself
    argv = check["command"] + check["args"]
    shell = shutil.which("sh")
    assert shell

    def run(env):
        return subprocess.run([shell, *argv[1:]], env={**env, "PATH": os.environ["PATH"]},
                              capture_output=True, text=True, timeout=10)

    assert run(secret).returncode == 1
    good = {k: f"s3cret-{k.lower()}-0123456789" for k in values}
    assert run(good).returncode == 0
    for name in values:
        for bad in ("", "CHANGE-ME-later"):
            result = run({**good, name: bad})
            assert result.returncode == 1 and "CHANGE-ME" in result.stderr, name


def matches(selector: dict, labels: dict) -> bool:
    """A label selector (matchLabels only; the policies here use nothing else) against labels."""
    assert set(selector) <= {"matchLabels"}, selector
    return selector.get("matchLabels", {}).items() <= labels.items()


def namespace_pods() -> dict[str, dict]:
    """The pods that share the namespace: this file's workloads and the KubeRay Ray pods,
    {name: template labels}."""
    pods = {d["metadata"]["name"]: d["spec"]["template"]["metadata"]["labels"]
            for d in k8s_documents() if d["kind"] in ("Deployment", "StatefulSet", "Job")}
    for kind, spec in kuberay_specs().items():
        for g in groups(spec):
            pods[f"{kind}/{g.get('groupName', 'head')}"] = g["template"]["metadata"]["labels"]
    return pods


def admitted(pod: str) -> tuple[set[str], set[int]]:
    """Which pods of namespace_pods() may connect to `pod`, and on which ports, under the
    NetworkPolicies of k8s.yaml."""
    pods = namespace_pods()
    sources, ports = set(), set()
    policies = [d for d in k8s_documents() if d["kind"] == "NetworkPolicy"]
    for policy in policies:
        spec = policy["spec"]
        if not matches(spec["podSelector"], pods[pod]):
            continue
        assert "Ingress" in spec["policyTypes"], policy["metadata"]["name"]
        for rule in spec.get("ingress") or []:
            name = policy["metadata"]["name"]
            # A rule without `from`, an empty selector, a namespace or an IP block would admit
            # pods (or hosts) beyond the ones named here.
            assert rule.get("from"), f"{name}: a rule open to every source"
            for peer in rule["from"]:
                assert set(peer) == {"podSelector"}, f"{name}: {peer}"
                assert peer["podSelector"].get("matchLabels"), f"{name}: {peer}"
                sources |= {p for p, labels in pods.items() if matches(peer["podSelector"], labels)}
            assert rule.get("ports"), f"{name}: a rule open on every port"
            for p in rule["ports"]:
                assert p.get("protocol", "TCP") == "TCP" and isinstance(p["port"], int), p
                ports.add(p["port"])
    return sources, ports


def test_k8s_network_policies_deny_by_default():
    policies = [d for d in k8s_documents() if d["kind"] == "NetworkPolicy"]
    deny = [p for p in policies if not p["spec"].get("ingress")
            and p["spec"]["policyTypes"] == ["Ingress"]]
    assert deny, "no default-deny ingress policy"
    own = {d["metadata"]["name"]: d["spec"]["template"]["metadata"]["labels"]
           for d in k8s_documents() if d["kind"] in ("Deployment", "StatefulSet", "Job")}
    for name, labels in own.items():
        assert any(matches(p["spec"]["podSelector"], labels) for p in deny), name


def test_k8s_mlflow_is_reachable_on_5000_from_the_ray_pods_only():
    sources, ports = admitted("mlflow")
    ray_pods = {p for p in namespace_pods() if "/" in p}
    assert len(ray_pods) == 4          # RayCluster and RayJob: head and GPU workers
    assert sources == ray_pods and ports == {5000}
    # The label the policy admits (documented in infra/README.md) is on every Ray pod template.
    (policy,) = [d for d in k8s_documents() if d["kind"] == "NetworkPolicy"
                 and d["spec"]["podSelector"]["matchLabels"].get("app.kubernetes.io/name")
                 == "mlflow"]
    (rule,) = policy["spec"]["ingress"]
    (peer,) = rule["from"]
    label = peer["podSelector"]["matchLabels"]
    assert label == {"app.kubernetes.io/part-of": "visiontune"}
    assert "app.kubernetes.io/part-of: visiontune" in (INFRA / "README.md").read_text()


def test_k8s_postgres_and_minio_are_reachable_from_mlflow_only():
    assert admitted("postgres") == ({"mlflow"}, {5432})
    # The bucket Job creates the artifact bucket once; the console (9001) is not opened.
    assert admitted("minio") == ({"mlflow", "minio-create-bucket"}, {9000})
    assert admitted("minio-create-bucket") == (set(), set())


def test_kuberay_head_services_stay_in_the_cluster():
    for name, spec in kuberay_specs().items():
        assert spec["headGroupSpec"].get("serviceType", "ClusterIP") == "ClusterIP", name


def test_basic_auth_ini_and_its_documentation():
    ini = configparser.ConfigParser()
    ini.read(INFRA / "mlflow/basic_auth.ini")
    section = ini["mlflow"]
    # Closed by default: a signed-in user gets nothing (or at most READ) without a grant.
    assert section["default_permission"] in {"NO_PERMISSIONS", "READ"}
    assert section["database_uri"].startswith(("sqlite:///", "postgresql://"))
    assert section["admin_username"]
    placeholder = section["admin_password"]
    assert "CHANGE" in placeholder   # a placeholder, clearly marked
    # ... and not a working password: MLflow refuses to create an admin with it.
    try:
        from mlflow.exceptions import MlflowException
        from mlflow.utils.validation import _validate_password
    except ImportError:              # a private helper; its rule is 12+ characters
        assert len(placeholder) < 12
    else:
        with pytest.raises(MlflowException):
            _validate_password(placeholder)
    assert section["authorization_function"] == \
        "mlflow.server.auth:authenticate_request_basic_auth"
    readme = (INFRA / "README.md").read_text()
    for needle in ("--app-name basic-auth", "MLFLOW_AUTH_CONFIG_PATH", "MLFLOW_TRACKING_USERNAME",
                   "MLFLOW_TRACKING_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY",
                   "MLFLOW_AUTH_ADMIN_PASSWORD", "127.0.0.1:5000", "NetworkPolicy",
                   "NO_PERMISSIONS", "never commit", "requirements-lock.txt", "TLS",
                   *sorted(COMPOSE_CREDENTIALS)):
        assert needle in readme, needle


def test_compose_env_file_is_ignored_by_git():
    git = shutil.which("git")
    if git is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    for name in ("infra/mlflow/.env", "infra/mlflow/.env.local"):
        result = subprocess.run([git, "check-ignore", "-q", name], cwd=ROOT, timeout=10)
        assert result.returncode == 0, f"{name} is not git-ignored"


# --- pinned images -------------------------------------------------------------------------------


def infra_images() -> list[tuple[str, str]]:
    """(file, image) for every image infra/ names: `image` (and `*_image`) values of every YAML
    document, commented-out ones aside, and every Dockerfile's FROM."""
    found = []
    for path in YAML_FILES:
        for doc in docs(path):
            for m in walk(doc):
                for key, value in m.items():
                    if (key == "image" or str(key).endswith("_image")) and isinstance(value, str):
                        found.append((rel(path), value))
    for path in DOCKERFILES:
        for ins, args in dockerfile_instructions(path):
            if ins == "FROM":
                found.append((rel(path), [t for t in args.split() if not t.startswith("--")][0]))
    return found


MINIO_RELEASE = re.compile(r"RELEASE\.\d{4}-\d\d-\d\dT\d\d-\d\d-\d\dZ")
# A full version: X.Y.Z (plus a variant suffix); PostgreSQL's versions are MAJOR.MINOR.
FULL_VERSION = re.compile(r"v?\d+\.\d+\.\d+([.+-][\w.+-]*)?")
POSTGRES_VERSION = re.compile(r"\d+\.\d+(-[\w.-]+)?")


def pinned(image: str) -> bool:
    """An image reference with a fixed version tag: not `latest`, not untagged, not a bare
    major or minor series such as postgres:16 or python:3.11-slim."""
    name = image.split("@", 1)[0]
    repo, _, tag = name.rpartition(":")
    if not repo or "/" in tag:           # no tag (a registry port is no tag)
        return False
    base = repo.rsplit("/", 1)[-1]
    if base in ("minio", "mc"):
        return bool(MINIO_RELEASE.fullmatch(tag))
    if base == "postgres":
        return bool(POSTGRES_VERSION.fullmatch(tag))
    return bool(FULL_VERSION.fullmatch(tag))


@pytest.mark.parametrize("image", [
    "postgres", "postgres:16", "postgres:latest", "python:3.11-slim", "python:3.11",
    "minio/minio:latest", "minio/mc", "visiontune:latest", "ghcr.io/org/visiontune:latest",
    "localhost:5000/visiontune", "nvidia/cuda:12.8-runtime-ubuntu24.04", "rayproject/ray:2.60",
])
def test_image_check_rejects_floating_tags(image):
    assert not pinned(image)


@pytest.mark.parametrize("image", [
    "postgres:16.9-bookworm", "python:3.11.13-slim-bookworm", "visiontune:0.1.0",
    "localhost:5000/visiontune:0.1.0", "minio/minio:RELEASE.2025-09-07T16-13-09Z",
    "nvidia/cuda:12.8.1-runtime-ubuntu24.04", "rayproject/ray:2.60.0-py311-gpu",
])
def test_image_check_accepts_pinned_tags(image):
    assert pinned(image)


def test_no_image_in_infra_floats():
    images = infra_images()
    files = {f for f, _ in images}
    assert {"infra/Dockerfile", "infra/mlflow/Dockerfile", "infra/mlflow/docker-compose.yaml",
            "infra/mlflow/k8s.yaml", "infra/kuberay/raycluster.yaml",
            "infra/ray-cluster-launcher.yaml"} <= files
    assert [(f, i) for f, i in images if not pinned(i)] == []
    # Nor in any comment or instruction: no `latest` tag anywhere in infra/.
    for path in INFRA.rglob("*"):
        if path.is_file():
            assert not re.search(r"[\w./-]:latest\b", path.read_text()), rel(path)


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
