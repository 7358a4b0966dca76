"""Ray for this process: connect to a cluster, or start a local Ray, and shut down only what
was started here. Used by the search (`pipelines/steps/tune.py`, `components.tuning`), the data
step's decoding on a cluster (`ray_map`) and `visiontune predict --ray` (`pipelines/predict.py`,
around `components.inference.ray_data`)."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from pathlib import Path

from components import storage
from components.errors import UnreachableError


def check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """A `host:port` address where nothing listens fails here, in one line: `ray.init` would
    retry the GCS for minutes. Other forms (`auto`, `ray://...`) are Ray's to resolve."""
    import socket

    host, _, port = address.rpartition(":")
    if storage.is_uri(address) or not port.isdigit():
        return
    try:
        socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout_s).close()
    except OSError as e:
        raise UnreachableError(f"no Ray cluster answers at {address}: "
                               f"{e.strerror or type(e).__name__}") from None


def enable_token_auth() -> None:
    """Ray's clients send the cluster's auth token (Ray 2.60 turns token auth on by default)
    only in token mode: turn it on when a token is at hand (RAY_AUTH_TOKEN,
    RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token), unless RAY_AUTH_MODE says otherwise."""
    if os.environ.get("RAY_AUTH_MODE"):
        return
    if (os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH")
            or (Path.home() / ".ray" / "auth_token").is_file()):
        os.environ["RAY_AUTH_MODE"] = "token"


@contextlib.contextmanager
def ray_session(address: str | None, num_cpus: int | None = None,
                runtime_env: dict | None = None):
    """Connect to `address`, or start a local Ray; shut down only what this process started.
    Nothing is asked of the cluster's nodes: no custom resources, no start flags.
    `runtime_env` is the driver's on a cluster (e.g. code the nodes do not have)."""
    given = bool(address)
    if given:   # inside a Ray job (RAY_ADDRESS), the job's own settings hold
        check_reachable(address)
        enable_token_auth()   # before ray is imported: it reads RAY_AUTH_MODE then
    import ray

    if ray.is_initialized():
        yield node_resources()
        return
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    # Inside a Ray job (visiontune submit) the job's cluster is the one to use.
    address = address or os.environ.get("RAY_ADDRESS") or None
    # Train V2's controller collects worker reports once per health-check interval (2 s by
    # default) and a worker waits for its report to be collected: short epochs were paced
    # at 2 s each. A local Ray's processes inherit this environment.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
    # ray.init replaces the process's SIGTERM handler (a Python one that exits, then the core
    # worker's crash handler, which aborts): the caller's handlers stay in force.
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        # Inside the try: a signal during start-up still shuts down what was started.
        if address:
            # On a cluster the report interval comes from the nodes' environment (infra/) or
            # the job's runtime_env (visiontune submit sets it).
            ray.init(address=address, log_to_driver=True, runtime_env=runtime_env)
        else:
            cpus = num_cpus or os.cpu_count() or 1
            # address="local": a new Ray of our own, even when a `ray start --head` is running
            # on this machine (plain ray.init() would join it and reject num_cpus).
            ray.init(address="local", num_cpus=cpus, log_to_driver=True)
        _restore_handlers(handlers)
        yield node_resources()
    finally:
        ray.shutdown()


def node_resources() -> list[dict[str, float]]:
    """Resources of every live node of the connected Ray cluster."""
    import ray

    return [dict(n["Resources"]) for n in ray.nodes() if n.get("Alive")]


def _restore_handlers(handlers: dict) -> None:
    if threading.current_thread() is not threading.main_thread():
        return
    for sig, handler in handlers.items():
        if handler is not None:
            signal.signal(sig, handler)


def ray_map(fn, items: list[tuple]):
    """(index, fn(*item)) for every item, as Ray tasks of 1 CPU over the connected cluster, at
    most twice its CPUs in flight, yielded as they finish."""
    import ray

    task = ray.remote(num_cpus=1)(fn)
    todo = iter(enumerate(items))
    limit = 2 * max(1, int(ray.cluster_resources().get("CPU", 1)))
    running: dict = {}
    while True:
        while len(running) < limit and (next_item := next(todo, None)) is not None:
            running[task.remote(*next_item[1])] = next_item[0]
        if not running:
            return
        (ready,), _ = ray.wait(list(running), num_returns=1)
        yield running.pop(ready), ray.get(ready)
