"""Reading infra/ for the policy tests: the manifests and the pods in them, the NetworkPolicies'
admitted clients, compose's published ports, image tags, lock files."""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
INFRA = ROOT / "infra"
# The Kubernetes manifests: every YAML file of infra/ but the compose file and the launcher's.
NOT_KUBERNETES = {"docker-compose.yaml", "ray-cluster-launcher.yaml"}


def docs(path: Path) -> list:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def one(path: Path) -> dict:
    (doc,) = docs(path)
    return doc


def rel(p: Path) -> str:
    return str(p.relative_to(ROOT))


def walk(node, strings: bool = False):
    """Every mapping of a parsed YAML document, depth first (or, with strings, every string,
    keys included)."""
    if isinstance(node, dict):
        if not strings:
            yield node
        for k, v in node.items():
            if strings:
                yield from walk(k, strings)
            yield from walk(v, strings)
    elif isinstance(node, list):
        for v in node:
            yield from walk(v, strings)
    elif strings and isinstance(node, str):
        yield node


def manifests() -> list[tuple[Path, dict]]:
    return [(p, d) for p in sorted(INFRA.rglob("*.yaml")) if p.name not in NOT_KUBERNETES
            for d in docs(p)]


def pod_specs() -> list[tuple[str, dict]]:
    """("file Kind/name part", pod spec) for every pod spec of every manifest: workloads' and
    Jobs' templates, each KubeRay group's template, the RayJob's submitter."""
    found = []
    for path, doc in manifests():
        where = f"{rel(path)} {doc['kind']}/{doc['metadata']['name']}"
        spec = doc.get("spec", {})
        cluster = spec.get("rayClusterSpec", spec) if doc["kind"].startswith("Ray") else None
        if cluster is not None:
            found.append((f"{where} head", cluster["headGroupSpec"]["template"]["spec"]))
            found += [(f"{where} {g['groupName']}", g["template"]["spec"])
                      for g in cluster["workerGroupSpecs"]]
            if "submitterPodTemplate" in spec:
                found.append((f"{where} submitter", spec["submitterPodTemplate"]["spec"]))
        elif "template" in spec:
            found.append((where, spec["template"]["spec"]))
    # Nothing with containers is left out of the list above.
    assert sum(1 for _, d in manifests() for m in walk(d) if "containers" in m) == len(found)
    return found


def k8s_documents() -> list[dict]:
    return docs(INFRA / "mlflow/k8s.yaml")


def k8s_by_kind_name() -> dict[tuple[str, str], dict]:
    return {(d["kind"], d["metadata"]["name"]): d for d in k8s_documents()}


def kuberay_specs() -> dict[str, dict]:
    """Every RayCluster spec in infra/kuberay: the RayCluster's and the RayJob's cluster."""
    return {"RayCluster": one(INFRA / "kuberay/raycluster.yaml")["spec"],
            "RayJob": one(INFRA / "kuberay/rayjob.yaml")["spec"]["rayClusterSpec"]}


def compose_services() -> dict:
    return one(INFRA / "mlflow/docker-compose.yaml")["services"]


# --- NetworkPolicies ------------------------------------------------------------------------------


def matches(selector: dict, labels: dict) -> bool:
    """A label selector (matchLabels only; the policies here use nothing else) against labels."""
    assert set(selector) <= {"matchLabels"}, selector
    return selector.get("matchLabels", {}).items() <= labels.items()


def namespace_pods() -> dict[str, dict]:
    """The pods that share the namespace, {name: template labels}: k8s.yaml's workloads and the
    KubeRay Ray pods ("RayCluster/head", ...)."""
    pods = {d["metadata"]["name"]: d["spec"]["template"]["metadata"]["labels"]
            for d in k8s_documents() if d["kind"] in ("Deployment", "StatefulSet", "Job")}
    for kind, spec in kuberay_specs().items():
        for g in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
            pods[f"{kind}/{g.get('groupName', 'head')}"] = g["template"]["metadata"]["labels"]
    return pods


def admitted(pod: str) -> tuple[set[str], set[int]]:
    """Which pods of namespace_pods() may connect to `pod`, and on which ports."""
    pods = namespace_pods()
    sources, ports = set(), set()
    for policy in [d for d in k8s_documents() if d["kind"] == "NetworkPolicy"]:
        spec, name = policy["spec"], policy["metadata"]["name"]
        if not matches(spec["podSelector"], pods[pod]):
            continue
        assert "Ingress" in spec["policyTypes"], name
        for rule in spec.get("ingress") or []:
            # A rule without `from`, an empty selector, a namespace or an IP block would admit
            # pods (or hosts) beyond the ones named here; one without ports, every port.
            assert rule.get("from") and rule.get("ports"), f"{name}: a rule open to all"
            for peer in rule["from"]:
                assert set(peer) == {"podSelector"} and peer["podSelector"].get("matchLabels"), \
                    f"{name}: {peer}"
                sources |= {p for p, labels in pods.items() if matches(peer["podSelector"], labels)}
            for p in rule["ports"]:
                assert p.get("protocol", "TCP") == "TCP" and isinstance(p["port"], int), p
                ports.add(p["port"])
    return sources, ports


# --- compose ports, image tags, locks, Dockerfiles ------------------------------------------------


def binds_loopback_only(port) -> bool:
    """A compose `ports` entry bound to a loopback address (a bare port, HOST:CONTAINER or the
    long syntax without host_ip bind every interface)."""
    if isinstance(port, dict):
        ip = port.get("host_ip")
    else:
        spec = re.sub(r"\$\{\w+:?-([^}]*)\}", r"\1", str(port)).split("/")[0]  # ${VAR:-default}
        if spec.startswith("["):                       # [IPv6]:HOST:CONTAINER
            ip = spec[1:].split("]", 1)[0]
        else:
            parts = spec.rsplit(":", 2)
            ip = parts[0] if len(parts) == 3 else None
    try:
        return ip is not None and ipaddress.ip_address(ip).is_loopback
    except ValueError:
        return False


MINIO_RELEASE = re.compile(r"RELEASE\.\d{4}-\d\d-\d\dT\d\d-\d\d-\d\dZ")
# A full version: X.Y.Z (plus a variant suffix); PostgreSQL's versions are MAJOR.MINOR.
FULL_VERSION = re.compile(r"v?\d+\.\d+\.\d+([.+-][\w.+-]*)?")
POSTGRES_VERSION = re.compile(r"\d+\.\d+(-[\w.-]+)?")


def pinned(image: str) -> bool:
    """An image reference with a fixed version tag: not `latest`, not untagged, not a bare
    major or minor series such as postgres:16 or python:3.11-slim."""
    repo, _, tag = image.split("@", 1)[0].rpartition(":")
    if not repo or "/" in tag:           # no tag (a registry port is no tag)
        return False
    base = repo.rsplit("/", 1)[-1]
    if base in ("minio", "mc"):
        return bool(MINIO_RELEASE.fullmatch(tag))
    if base == "postgres":
        return bool(POSTGRES_VERSION.fullmatch(tag))
    return bool(FULL_VERSION.fullmatch(tag))


def read_lock(path: Path) -> dict[str, str]:
    """{normalized name: version} of a lock file; every line a comment or name==version."""
    pins = {}
    for line in path.read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        m = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([\w.+!-]+)", line.strip())
        assert m, f"{rel(path)}: not a name==version pin: {line!r}"
        pins[re.sub(r"[-_.]+", "-", m.group(1)).lower()] = m.group(2)
    return pins


def dockerfile_user(path: Path) -> int:
    """The uid of a Dockerfile's last USER, which must be numeric (uid or uid:gid)."""
    users = re.findall(r"(?m)^USER\s+(\S+)", path.read_text())
    assert users and re.fullmatch(r"\d+(:\d+)?", users[-1]), f"{rel(path)}: USER {users}"
    return int(users[-1].split(":")[0])
