"""The `serve` command: check what would be served (one line when it cannot), then run the
follower's app under uvicorn, in this process or in `--workers` processes."""

from __future__ import annotations

import contextlib
import logging
import os
import signal

from components.errors import UserError


def add_serve_command(sub) -> None:
    sv = sub.add_parser(
        "serve", help="serve a registered model over HTTP (MLflow's scoring protocol), "
                      "following its alias: a promote or rollback is served without a restart")
    sv.add_argument("--model", required=True, metavar="NAME", help="registered model name")
    sv.add_argument("--alias", default="champion", help="the alias to follow (default: champion)")
    sv.add_argument("--host", default="127.0.0.1",
                    help="address to listen on (default: 127.0.0.1, this host only)")
    sv.add_argument("--port", "-p", type=int, default=5001, help="default: 5001")
    sv.add_argument("--workers", "-w", type=int, default=1,
                    help="server processes, each following the alias (default: 1)")
    sv.add_argument("--timeout", "-t", type=float, default=None,
                    help="seconds one request may take (default: "
                         "$MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT or 60)")
    sv.add_argument("--poll", type=float, default=10.0, metavar="SECONDS",
                    help="how often the registry is checked for a moved alias (default: 10; "
                         "POST /visiontune/refresh checks at once)")
    sv.add_argument("--tracking-uri", help="default: tracking.uri of the config")
    sv.add_argument("overrides", nargs="*", metavar="key=value",
                    help="config overrides, e.g. registry.require_promotion_record=true")
    sv.add_argument("--config", metavar="FILE")


def run_serve(args) -> int:
    from components.config import ConfigError, check_no_credentials

    for flag, value, low in (("--workers", args.workers, 1), ("--poll", args.poll, 0.5),
                             ("--port", args.port, 1),
                             ("--timeout", 1 if args.timeout is None else args.timeout, 0.1)):
        if value < low:   # before anything is imported: a usage mistake answers at once
            raise ConfigError(f"{flag} must be at least {low}, got {value}")
    check_no_credentials("--tracking-uri", args.tracking_uri)
    from pipelines.console import quiet_mlflow

    quiet_mlflow()   # before MLflow is imported
    from components.champion_server import (
        LOG_FORMAT,
        MAX_BODY_ENV,
        SETTINGS_ENV,
        TIMEOUT_ENV,
        Follower,
        Refused,
        ServeSettings,
        create_app,
        load_version,
    )
    from components.tracking import bound_http_retries
    from pipelines.compose import load_config

    for env in (MAX_BODY_ENV, TIMEOUT_ENV):   # read by every worker: checked once, here
        if os.environ.get(env) and not _positive_number(os.environ[env]):
            raise ConfigError(f"{env}={os.environ[env]!r} must be a positive number")
    bound_http_retries()   # a registry that is away costs a poll seconds, not minutes
    cfg = load_config(args.overrides, args.config)
    settings = ServeSettings(args.tracking_uri or cfg.tracking.uri, args.model, args.alias,
                             args.poll, cfg.registry.require_promotion_record)
    if args.timeout is not None:
        os.environ[TIMEOUT_ENV] = str(args.timeout)
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    log = logging.getLogger("visiontune.serve")
    follower = Follower(settings)
    try:
        # Several workers load it each on their own: it is loaded and verified here first, so
        # a version that cannot serve is one line, not a worker that dies at start-up.
        version = follower.start().version if args.workers == 1 else \
            load_version(settings, follower.resolve()).version
    except Refused as e:
        raise UserError(f"cannot serve {e}") from None
    log.warning(f"serving models:/{args.model}/{version} (alias {args.alias}) on "
                f"http://{args.host}:{args.port} with {args.workers} worker(s); checking the "
                f"registry every {args.poll:g} s")
    return _run_uvicorn(args, follower, settings, create_app, SETTINGS_ENV)


def _run_uvicorn(args, follower, settings, create_app, settings_env: str) -> int:
    """One process: the follower already holds its version. Several: each worker loads and
    follows on its own (uvicorn's factory), the parent only supervises."""
    import uvicorn

    StoppingServer = _server_class()
    common = dict(host=args.host, port=args.port, log_level="warning",
                  timeout_graceful_shutdown=30, access_log=False)
    try:
        if args.workers == 1:
            StoppingServer(uvicorn.Config(create_app(follower), **common)).run()
        else:
            follower.stop()
            os.environ[settings_env] = settings.to_env()
            uvicorn.run("components.champion_server:worker_app", factory=True,
                        workers=args.workers, **common)
    except SystemExit as e:   # uvicorn's own exit: the port taken, a worker that failed
        if e.code not in (None, 0):
            raise UserError(f"the server on {args.host}:{args.port} stopped (uvicorn exit "
                            f"{e.code}): is the port in use? see the lines above") from None
    return 0


def _positive_number(text: str) -> bool:
    try:
        return float(text) > 0
    except ValueError:
        return False


def _server_class():
    import uvicorn

    class StoppingServer(uvicorn.Server):
        """uvicorn re-raises SIGTERM / SIGINT after its graceful shutdown, so the process
        would end killed by the signal; a requested stop of a server is its normal end (exit
        0, as uvicorn's own multi-worker supervisor ends)."""

        @contextlib.contextmanager
        def capture_signals(self):
            previous = {sig: signal.signal(sig, self.handle_exit)
                        for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

    return StoppingServer
