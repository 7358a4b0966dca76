"""Submit the pipeline to a Ray cluster as a Ray job (Job Submission SDK)."""

from __future__ import annotations

import os
import shlex
import sys
import time
from pathlib import Path

from components.errors import ConfigError, NotFoundError, UnreachableError
from components.names import new_id

AGENT_WAIT_S = 60   # how long submit waits for a new head's job agent

# Never uploaded with the code: data, tracking stores, checkpoints, environments, caches.
# gitignore syntax: a leading "/" anchors at the project root, so /data/ does not also drop
# components/data/.
EXCLUDES = [
    "/.git/", "/.venv/", "/venv/", "__pycache__/", "*.egg-info/", ".pytest_cache/",
    ".ruff_cache/", "mlruns/", "mlartifacts/", "ray_results/", "*.db", "*.pt", "*.pth",
    "*.ckpt", "*.pkl", "/data/", "/data_cache/", "/.cache/", "/outputs/", "/build/", "/dist/",
    "/.whl/", "/.gl/", "*.png", "*.jpg", "*.jpeg",
    # secrets next to the code (infra/README suggests a .env for passwords) never travel
    ".env", ".env.*", "*.env", ".netrc", ".aws/", ".mlflow/", "*.pem", "*.key",
]
JOB_ID_ENV, CLUSTER_ENV = "VISIONTUNE_RAY_JOB_ID", "VISIONTUNE_RAY_CLUSTER"


def project_root() -> Path:
    return Path(__file__).resolve().parents[1]


def job_client(address: str, token: str | None = None):
    from components.cluster import enable_token_auth

    enable_token_auth()
    from ray.job_submission import JobSubmissionClient

    headers = {"Authorization": f"Bearer {token}"} if token else None
    return JobSubmissionClient(address, headers=headers)


def dashboard_url(address: str) -> str:
    return address if address.startswith("http") else f"http://{address}"


def cluster_token(token: str | None = None) -> str | None:
    """The cluster's auth token, where Ray's own clients look for it: --token,
    RAY_AUTH_TOKEN, the file RAY_AUTH_TOKEN_PATH names, or ~/.ray/auth_token."""
    if token or os.environ.get("RAY_AUTH_TOKEN"):
        return token or os.environ["RAY_AUTH_TOKEN"]
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    return path.read_text().strip() if path.is_file() else None


class JobsAPI:
    """Ray's Jobs REST API over plain HTTP (what the Job Submission SDK calls): `jobs` and
    `status` answer at once, without importing Ray."""

    def __init__(self, address: str, token: str | None = None):
        self.base = dashboard_url(address).rstrip("/")
        token = cluster_token(token)
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}

    def _get(self, path: str):
        import json
        import urllib.error
        import urllib.request

        request = urllib.request.Request(self.base + path, headers=self.headers)
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as e:
            if e.code == 404:
                raise NotFoundError(f"no such job at {self.base}: {path.split('/')[3]}") from None
            if e.code in (401, 403):
                raise UnreachableError(
                    f"the Ray dashboard at {self.base} refused the request ({e.code}): give "
                    "its token with --token or RAY_AUTH_TOKEN") from None
            raise UnreachableError(f"the Ray dashboard at {self.base} answered {e.code}: "
                                   f"{e.reason}") from None
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise UnreachableError(f"cannot reach the Ray dashboard at {self.base}: "
                                   f"{reason}") from None

    def list_jobs(self) -> list[dict]:
        return self._get("/api/jobs/")

    def job(self, job_id: str) -> dict:
        return self._get(f"/api/jobs/{job_id}")

    def logs(self, job_id: str) -> str:
        return self._get(f"/api/jobs/{job_id}/logs").get("logs", "")


def build_entrypoint(overrides: list[str], config_file: str | None) -> str:
    parts = ["visiontune", "run", *overrides]
    if config_file:
        # The experiment file travels inside the working_dir: refer to it relatively.
        path = Path(config_file).resolve()
        try:
            parts += ["--config", str(path.relative_to(project_root()))]
        except ValueError:
            raise ConfigError(f"--config {config_file} must be inside the project "
                              f"({project_root()}) to travel with the job") from None
    return shlex.join(parts)


def submit(address: str, overrides: list[str], config_file: str | None = None,
           token: str | None = None, env: dict[str, str] | None = None) -> tuple[str, object]:
    client = job_client(address, token)
    job_id = new_id("visiontune")
    from components.tracking import HTTP_RETRY_ENV

    # The job's processes get bounded MLflow retries too (a lost server ends the job with
    # a clear error instead of minutes of retrying in every trial).
    env_vars = {JOB_ID_ENV: job_id, CLUSTER_ENV: address,
                "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2", **HTTP_RETRY_ENV,
                **{k: os.environ[k] for k in (*HTTP_RETRY_ENV, "VISIONTUNE_DEBUG")
                   if k in os.environ}, **(env or {})}
    request = dict(entrypoint=build_entrypoint(overrides, config_file), submission_id=job_id,
                   runtime_env={"working_dir": str(project_root()), "excludes": EXCLUDES,
                                "env_vars": env_vars},
                   metadata={"project": "visiontune"})
    deadline, said = time.monotonic() + AGENT_WAIT_S, False
    while True:
        try:
            client.submit_job(**request)
            return job_id, client
        except RuntimeError as e:
            # A head that has just started answers 500 "No available agent to submit job,
            # please try again later" until its job agent is up: wait for it, bounded.
            if "No available agent" not in str(e):
                raise
            if time.monotonic() > deadline:
                raise UnreachableError(
                    f"{address}: the cluster's job agent did not come up in {AGENT_WAIT_S} s "
                    f"(Ray: {str(e).strip().splitlines()[0]}); its log on the head node is "
                    f"dashboard_agent.log (a port taken by another Ray, for one)") from None
            if not said:
                print(f"visiontune: the cluster's job agent is not up yet; retrying for up "
                      f"to {AGENT_WAIT_S} s", file=sys.stderr, flush=True)
                said = True
            time.sleep(2)


def follow(client, job_id: str) -> str:
    """Stream the job's logs to stdout until it ends; returns its final status."""
    import asyncio

    async def tail():
        async for lines in client.tail_job_logs(job_id):
            # the job's own log is the command's output (data, not a line of ours): stdout
            print(lines, end="", flush=True)

    asyncio.run(tail())
    for _ in range(60):  # the log stream can close a moment before the status settles
        status = str(client.get_job_status(job_id).value)
        if status in ("SUCCEEDED", "FAILED", "STOPPED"):
            return status
        time.sleep(1)
    return status
