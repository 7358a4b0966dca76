"""The `visiontune` command line."""

from __future__ import annotations

import argparse
import os
import sys
import traceback

from components import storage
from components.errors import EXIT_ERROR, ConfigError, UserError, first_line
from pipelines.cli_help import LazyConfigHelp, add_config_args
from pipelines.console import log_to_console, quiet_mlflow
from pipelines.predict import RAY_ABOVE as _RAY_ABOVE
from pipelines.predict import RAY_ABOVE_ENV as _RAY_ABOVE_ENV
from pipelines.registry_commands import (
    add_registry_commands,
    cmd_approve,
    cmd_promote,
    cmd_rollback,
)
from pipelines.serve import add_serve_command

DEBUG_ENV = "VISIONTUNE_DEBUG"


class Parser(argparse.ArgumentParser):
    """argparse, whose mistakes are one line like every other mistake of the command line
    (exit 2): `visiontune predict: error: the following arguments are required: --model, PATH
    (see visiontune predict --help)`, instead of argparse's usage block and the error."""

    commands: dict[str, argparse.ArgumentParser] = {}   # the top parser's: name -> its parser

    def error(self, message: str):
        self.exit(ConfigError.exit_code, f"{self.prog}: error: {message} (see {self.prog} "
                                         f"--help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="visiontune",
        description="Search, train, evaluate and register image classifiers with Ray Tune, "
                    "Ray Train and MLflow.")
    parser.add_argument("--debug", action="store_true",
                        help=f"show Python tracebacks (also {DEBUG_ENV}=1)")
    sub = parser.add_subparsers(dest="command", required=True)
    parser.commands = sub.choices
    _add_pipeline_commands(sub)
    add_registry_commands(sub)
    _add_predict_command(sub)
    add_serve_command(sub)
    for command in sub.choices.values():  # `visiontune run --debug` works as well
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                             help=argparse.SUPPRESS)
        command.set_defaults(command_parser=command)   # its usage mistakes name the command
    return parser


def _add_pipeline_commands(sub) -> None:
    """run, and the Ray job commands: submit, jobs, status."""
    run = sub.add_parser(
        "run", help="run the training pipeline (ingest, validate, split, tune, evaluate, "
                    "register)",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=LazyConfigHelp())
    add_config_args(run)
    run.add_argument("--resume", metavar="PIPELINE_ID",
                     help="continue an interrupted run with its own logged config (its id is "
                          "printed at the start); only tracking.uri, ray.address and "
                          "ray.num_cpus may be given with it")
    run.add_argument("--extend", metavar="PIPELINE_ID",
                     help="add trials to a finished run: give a larger budget "
                          "(search.num_samples=N, search.max_trials=N or search.budget=...); "
                          "its trials are kept and a new version is registered only if the "
                          "best trial changes")
    run.add_argument("--warm-start", metavar="PIPELINE_ID",
                     help="a new run whose Optuna searcher is first told the trials of "
                          "another run (search.algorithm=optuna)")
    run.add_argument("--print-config", action="store_true",
                     help="print the resolved config and exit")
    run.add_argument("--verbose", action="store_true",
                     help="show Ray's and Tune's own output here (by default it goes to a log "
                          "file in the run's folder, whose path is printed)")

    sb = sub.add_parser("submit", help="submit the pipeline to a Ray cluster as a Ray job")
    sb.add_argument("--address", required=True,
                    help="the cluster's dashboard / job server, e.g. http://HOST:8265")
    sb.add_argument("--follow", action="store_true",
                    help="stream the job's logs; exit code 0 only if the job succeeded")
    sb.add_argument("--token", help="Ray auth token (default: RAY_AUTH_TOKEN or "
                                    "~/.ray/auth_token when present)")
    add_config_args(sb)

    jobs = sub.add_parser("jobs", help="list this cluster's visiontune jobs")
    jobs.add_argument("--address", required=True)
    jobs.add_argument("--token")
    st = sub.add_parser("status", help="a job's status (and --logs)")
    st.add_argument("job_id")
    st.add_argument("--address", required=True)
    st.add_argument("--token")
    st.add_argument("--logs", action="store_true")


def _add_predict_command(sub) -> None:
    pd = sub.add_parser("predict", help="classify images with a registered model")
    pd.add_argument("--model", required=True, help="e.g. models:/NAME@champion")
    pd.add_argument("paths", nargs="+", metavar="PATH",
                    help="image files, folders or object-storage prefixes (s3://bucket/dir); "
                         "a section.key=value that is not a file is a config override (e.g. "
                         "registry.require_promotion_record=true)")
    pd.add_argument("--config", metavar="FILE", help="an experiment YAML (its tracking and "
                                                     "registry keys)")
    pd.add_argument("--output", "-o",
                    help="CSV file, or Parquet if it ends in .parquet (default: CSV on stdout)")
    pd.add_argument("--tracking-uri", help="default: tracking.uri of the config")
    pd.add_argument("--ray", action=argparse.BooleanOptionalAction, default=None,
                    help="run as a Ray Data job over the cluster (default: from "
                         f"{_RAY_ABOVE:,} images on, or ${_RAY_ABOVE_ENV})")
    pd.add_argument("--address", help="Ray cluster to run on (implies --ray; default: "
                                      "$RAY_ADDRESS, else a local Ray)")
    pd.add_argument("--workers", type=int,
                    help="Ray actors for --ray, 1 CPU each (default: every CPU of the cluster)")
    pd.add_argument("--batch-size", type=int, default=64, help="images per model call")
    pd.add_argument("--verbose", action="store_true",
                    help="show Ray's and MLflow's own output on the terminal")


def cmd_run(args) -> int:
    if not args.verbose:   # before MLflow is imported (the steps import it; `--resume` reads
        quiet_mlflow()     # the run's config from MLflow): its INFO lines are not the story
    import yaml

    from components.config import to_dict
    from pipelines.compose import extend_config, load_config, resume_config

    given = [f for f, v in (("--resume", args.resume), ("--extend", args.extend),
                            ("--warm-start", args.warm_start)) if v]
    if len(given) > 1:
        raise ConfigError(f"{' and '.join(given)} cannot be combined: --resume continues a "
                          "run, --extend adds trials to a finished one, --warm-start starts "
                          "a new one")
    before = None
    if (args.resume or args.extend) and args.config:
        raise ConfigError(f"{given[0]} continues a run with its own logged config: --config "
                          "cannot be combined with it")
    if args.resume:
        cfg = resume_config(args.resume, args.overrides)
    elif args.extend:
        cfg, before, _ = extend_config(args.extend, args.overrides)
    else:
        cfg = load_config(args.overrides, args.config)
    if args.warm_start and cfg.search.algorithm != "optuna":   # before a run is created
        from pipelines.steps.extend import WARM_START_NEEDS

        raise ConfigError(WARM_START_NEEDS)
    if args.verbose:
        from pipelines.console import console

        console.verbose = True
    if args.print_config:
        print(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        return 0
    from pipelines.training import run_training_pipeline, summary

    result = run_training_pipeline(cfg, resume=args.resume or args.extend,
                                   extend_from=before, warm_start=args.warm_start)
    print(summary(result))
    return 0


def cmd_submit(args) -> int:
    from components.config import check_no_credentials
    from pipelines.compose import load_config
    from pipelines.jobs import dashboard_url, follow, submit

    # The address is recorded with every run of the job (visiontune.ray_cluster_address).
    check_no_credentials("--address", args.address)
    # Fail fast on a bad config, here rather than in a job minutes later.
    cfg = load_config(args.overrides, args.config, resolve=False)
    path = cfg.data.path
    if path and not storage.is_uri(path) and not path.startswith("/"):
        raise ConfigError(f"data.path={path} is relative: on a cluster it must be a path every "
                          "node sees (absolute, on shared storage) or a URL")
    if cfg.tracking.uri is None or not cfg.tracking.uri.startswith(("http://", "https://")):
        print("visiontune: warning: no tracking.uri=http://... given: the job logs to a "
              "SQLite file in its own working directory on the cluster", file=sys.stderr)
    job_id, client = submit(args.address, args.overrides, args.config, args.token)
    print(f"submitted job {job_id}\n  dashboard: {dashboard_url(args.address)}/#/jobs/{job_id}"
          f"\n  status:    visiontune status {job_id} --address {args.address}", flush=True)
    if not args.follow:
        return 0
    status = follow(client, job_id)
    print(f"job {job_id} {status}")
    return 0 if status == "SUCCEEDED" else 1


def _dashboard(address: str) -> str:
    """The Ray dashboard's address of `jobs` and `status` (they call its REST API)."""
    from components.config import check_no_credentials

    check_no_credentials("--address", address)   # a token goes in --token
    scheme = address.partition("://")[0] if "://" in address else ""
    if scheme not in ("", "http", "https"):
        raise ConfigError(f"--address {address} is not the Ray dashboard's address: give "
                          "http://HOST:8265 (or HOST:8265)")
    return address


def cmd_jobs(args) -> int:
    from pipelines.jobs import JobsAPI

    for job in sorted(JobsAPI(_dashboard(args.address), args.token).list_jobs(),
                      key=lambda j: j.get("start_time") or 0):
        job_id = job.get("submission_id") or ""
        if job_id.startswith("visiontune-"):
            print(f"{job_id}  {job.get('status', '?'):<10} {job.get('entrypoint', '')}")
    return 0


def cmd_status(args) -> int:
    from pipelines.jobs import JobsAPI

    api = JobsAPI(_dashboard(args.address), args.token)
    info = api.job(args.job_id)
    print(f"{args.job_id}  {info.get('status', '?')}  {info.get('message') or ''}")
    if args.logs:
        print(api.logs(args.job_id))
    return 0


def cmd_serve(args) -> int:
    from pipelines.serve import run_serve

    return run_serve(args)


def cmd_predict(args) -> int:
    from pipelines.predict import run_predict

    return run_predict(args)


COMMANDS = {"run": cmd_run, "submit": cmd_submit, "jobs": cmd_jobs, "status": cmd_status,
            "promote": cmd_promote, "approve": cmd_approve, "rollback": cmd_rollback,
            "predict": cmd_predict, "serve": cmd_serve}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # Positionals after an option (`predict DIR --tracking-uri U registry.x=y`) belong to the
    # command's own positional list, as a user reads the line.
    rest = "paths" if hasattr(args, "paths") else "overrides"
    if extra and hasattr(args, rest) and not any(a.startswith("-") for a in extra):
        setattr(args, rest, [*getattr(args, rest), *extra])
    elif extra:
        args.command_parser.error(f"unrecognized arguments: {' '.join(extra)}")
    debug = args.debug or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    log_to_console()   # the components' lines (they log them) on the console, as printed
    from pipelines.interrupt import Interrupted, interrupted

    try:
        return COMMANDS[args.command](args)
    except UserError as e:   # a mistake a user can fix: one line, its kind's exit code
        _report(f"{e.label}: {first_line(e, None)}", debug)
        return e.exit_code
    except Interrupted as e:
        return _report_interrupted(e, debug)
    except KeyboardInterrupt:
        _report("interrupted", debug)
        return 130
    except Exception as e:   # a bug, or a failure nobody named: its type says which
        if (stop := interrupted(e)) is not None:   # a signal that C code wrapped
            return _report_interrupted(stop, debug)
        _report(f"error: {type(e).__name__}: {first_line(e, None)} (run with --debug or "
                f"{DEBUG_ENV}=1 for the traceback)", debug)
        return EXIT_ERROR


def _report_interrupted(e, debug: bool) -> int:
    """The one line of a command a signal stopped, and its exit code (130 for SIGINT)."""
    pipeline_id = getattr(e, "pipeline_id", None)
    if getattr(e, "extension", False):
        _report(f"interrupted by {e}: the extension of run {pipeline_id} stopped and "
                "registered nothing; the run keeps its finished sweep and version; "
                f"continue the extension with: visiontune run --resume {pipeline_id}", debug)
        return e.exit_code
    _report(f"interrupted by {e}" + (
        f": run {pipeline_id} is recorded as KILLED, nothing was registered; continue it "
        f"with: visiontune run --resume {pipeline_id}" if pipeline_id else ""), debug)
    return e.exit_code


def _report(text: str, debug: bool) -> None:
    if debug:
        traceback.print_exc()
    print(f"visiontune: {text}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
