"""The `visiontune` command line."""

from __future__ import annotations

import argparse
import os
import sys
import traceback

from components import storage
from components.config import ConfigError
from components.errors import first_line
from components.evaluation.paired import DEFAULT_RESAMPLES
from pipelines.cli_help import LazyConfigHelp
from pipelines.console import quiet_mlflow
from pipelines.predict import RAY_ABOVE as _RAY_ABOVE
from pipelines.predict import RAY_ABOVE_ENV as _RAY_ABOVE_ENV
from pipelines.serve import add_serve_command

EXIT_FAILED, EXIT_CONFIG = 1, 2
DEBUG_ENV = "VISIONTUNE_DEBUG"

def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config overrides: group=option or section.key=value")
    p.add_argument("--config", metavar="FILE",
                   help="an experiment YAML (e.g. conf/experiment/quick.yaml)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="visiontune",
        description="Search, train, evaluate and register image classifiers with Ray Tune, "
                    "Ray Train and MLflow.")
    parser.add_argument("--debug", action="store_true",
                        help=f"show Python tracebacks (also {DEBUG_ENV}=1)")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_pipeline_commands(sub)
    _add_registry_commands(sub)
    _add_predict_command(sub)
    add_serve_command(sub)
    for command in sub.choices.values():  # `visiontune run --debug` works as well
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                             help=argparse.SUPPRESS)
    return parser


def _add_pipeline_commands(sub) -> None:
    """run, and the Ray job commands: submit, jobs, status."""
    run = sub.add_parser(
        "run", help="run the training pipeline (ingest, validate, split, tune, evaluate, "
                    "register)",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=LazyConfigHelp())
    _add_config_args(run)
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
    _add_config_args(sb)

    jobs = sub.add_parser("jobs", help="list this cluster's visiontune jobs")
    jobs.add_argument("--address", required=True)
    jobs.add_argument("--token")
    st = sub.add_parser("status", help="a job's status (and --logs)")
    st.add_argument("job_id")
    st.add_argument("--address", required=True)
    st.add_argument("--token")
    st.add_argument("--logs", action="store_true")


def _add_registry_commands(sub) -> None:
    """promote and rollback."""
    pr = sub.add_parser(
        "promote", help="score the challenger and the champion on the same images; move the "
                        "champion alias only when the challenger is shown to be better")
    pr.add_argument("--model", required=True, help="registered model name")
    pr.add_argument("--version", help="challenger version (default: alias challenger)")
    pr.add_argument("--data", metavar="PATH_OR_URI",
                    help="score both on this labelled folder or CSV manifest (a CSV with a "
                         "split column: its test rows) instead of the challenger's test split; "
                         "images either version trained or was selected on are dropped")
    pr.add_argument("--confidence", type=float, default=0.95,
                    help="of the F1 difference's interval; the tests are one-sided at "
                         "(1 - confidence) / 2 (default: 0.95)")
    pr.add_argument("--non-inferior", type=float, metavar="MARGIN",
                    help="promote a challenger that is not worse by more than MARGIN of F1 "
                         "(a smaller or faster model) instead of requiring it to be better")
    pr.add_argument("--resamples", type=int, default=DEFAULT_RESAMPLES,
                    help=f"paired bootstrap resamples (default and minimum: "
                         f"{DEFAULT_RESAMPLES:,})")
    pr.add_argument("--seed", type=int,
                    help="of the resamples (default: derived from the two versions and the "
                         "images, so the same comparison gets the same answer)")
    pr.add_argument("--dry-run", action="store_true",
                    help="decide, record and print; move no alias and tag no version")
    pr.add_argument("--force", action="store_true",
                    help="promote whatever the evidence (recorded as forced)")
    pr.add_argument("--approve-by", metavar="NAME",
                    help="record a promotion as pending until NAME runs `visiontune approve` "
                         "(registry.approval=required: anyone may)")
    _add_config_args(pr)
    ap = sub.add_parser("approve", help="move champion to a version whose promotion waits for "
                                        "approval; who approved is recorded")
    ap.add_argument("--model", required=True)
    ap.add_argument("--version", required=True)
    ap.add_argument("--by", required=True, metavar="NAME", help="who approves")
    _add_config_args(ap)
    rb = sub.add_parser("rollback", help="move champion back to previous-champion (or to the "
                                         "last recorded champion, if it was moved by hand)")
    rb.add_argument("--model", required=True)
    _add_config_args(rb)


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
    import yaml

    from components.config import to_dict
    from pipelines.config import extend_config, load_config, resume_config
    from pipelines.steps.extend import WARM_START_NEEDS
    from pipelines.training import run_training_pipeline, summary

    if not args.verbose:
        quiet_mlflow()  # before `--resume` reads the run's config from MLflow
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
        raise ConfigError(WARM_START_NEEDS)
    if args.verbose:
        from pipelines.console import console

        console.verbose = True
    if args.print_config:
        print(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        return 0
    result = run_training_pipeline(cfg, resume=args.resume or args.extend,
                                   extend_from=before, warm_start=args.warm_start)
    print(summary(result))
    return 0


def _tracking(args):
    from components.tracking import Tracker, bound_http_retries
    from pipelines.config import load_config

    bound_http_retries()  # a server that went away fails in seconds, not minutes
    cfg = load_config(args.overrides, args.config)
    return cfg, Tracker(cfg.tracking.uri)


def cmd_submit(args) -> int:
    from components.config import check_no_credentials
    from pipelines.config import load_config
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
    status = follow(client, job_id, lambda *a, **k: print(*a, **k, flush=True))
    print(f"job {job_id} {status}")
    return 0 if status == "SUCCEEDED" else 1


def cmd_jobs(args) -> int:
    from pipelines.jobs import JobsAPI

    for job in sorted(JobsAPI(args.address, args.token).list_jobs(),
                      key=lambda j: j.get("start_time") or 0):
        job_id = job.get("submission_id") or ""
        if job_id.startswith("visiontune-"):
            print(f"{job_id}  {job.get('status', '?'):<10} {job.get('entrypoint', '')}")
    return 0


def cmd_status(args) -> int:
    from pipelines.jobs import JobsAPI

    api = JobsAPI(args.address, args.token)
    info = api.job(args.job_id)
    print(f"{args.job_id}  {info.get('status', '?')}  {info.get('message') or ''}")
    if args.logs:
        print(api.logs(args.job_id))
    return 0


EXIT_NOT_PROMOTED = 3


def cmd_promote(args) -> int:
    quiet_mlflow()  # the decision is the story here
    from components.registry import promote
    from components.tracking.links import review_links

    if not 0.5 <= args.confidence < 1:
        raise ConfigError(f"--confidence={args.confidence} must be in [0.5, 1), e.g. 0.95")
    if args.non_inferior is not None and not 0 < args.non_inferior < 1:
        raise ConfigError(f"--non-inferior={args.non_inferior} is a margin of F1 in (0, 1), "
                          f"e.g. 0.01")
    if args.resamples < DEFAULT_RESAMPLES:
        raise ConfigError(f"--resamples={args.resamples}: at least {DEFAULT_RESAMPLES:,}")
    from components.config import check_no_credentials

    check_no_credentials("--data", args.data)   # it is recorded with the decision
    from components.registry import Evidence

    cfg, tracker = _tracking(args)
    reg = cfg.registry
    evidence = Evidence(min_images=reg.min_images, max_comparisons=reg.max_comparisons,
                        near_copy_distance=cfg.data.near_copy_distance,
                        max_class_drop=reg.max_class_drop)
    approver = args.approve_by or ("any" if reg.approval == "required" else None)
    r = promote(tracker, args.model, args.version, data=args.data, confidence=args.confidence,
                min_gain=reg.min_f1_gain, non_inferior=args.non_inferior,
                resamples=args.resamples, seed=args.seed, force=args.force,
                dry_run=args.dry_run, echo=_echo, experiment_name=cfg.tracking.experiment_name,
                evidence=evidence, policy=_policy(cfg, approver))
    for line in promotion_lines(r):
        print(line)
    speed = speed_comparison(tracker, args.model, r)
    if speed:
        print(f"  {'trade-off' if args.non_inferior is not None else 'speed'}: {speed}")
    verdict = "promote" if r.promote else "keep the champion"
    print(f"{verdict}: {r.reason}" + (" [dry run: no alias moved]" if args.dry_run else ""))
    if r.applied:
        print(f"models:/{args.model}@champion -> version {r.challenger.version}"
              + (f" (previous-champion -> {r.champion.version})" if r.champion else ""))
    elif r.awaiting:
        by = r.awaiting if r.awaiting != "any" else "NAME"
        print(f"pending approval: nothing moved until `visiontune approve --model {args.model} "
              f"--version {r.challenger.version} --by {by}`")
    if r.run_id:
        link = review_links(tracker.uri, r.experiment_id, r.run_id)["run"]
        print(f"record: {link}")
    return 0 if r.promote else EXIT_NOT_PROMOTED


def promotion_lines(r) -> list[str]:
    """The evidence, as the console shows it before the verdict."""
    from components.registry.record import evidence_lines

    if r.paired is None:
        return []
    lines = [f"  {line}" for line in evidence_lines(r)]
    if r.left_out:
        lines.append(f"  {len(r.left_out):,} images could not be read by a model and were "
                     f"left out (first: {r.left_out[0][0]}: {r.left_out[0][1]})")
    return lines


def _echo(line: str) -> None:
    print(line, flush=True)


def _policy(cfg, approver: str | None = None):
    from components.registry import ChampionPolicy

    reg = cfg.registry
    return ChampionPolicy(hooks=tuple(reg.hooks), hook_attempts=reg.hook_attempts,
                          require_record=reg.require_promotion_record, approver=approver)


def speed_comparison(tracker, name: str, r) -> str | None:
    """Both versions' measured speed and size, from their version tags (registration
    measured them), as one line; None when either was not measured."""
    from components.serving.speed import HARDWARE_TAG, compare_line, speed_of

    if r.champion is None or r.champion.version == r.challenger.version:
        return None
    tags = [tracker.client.get_model_version(name, c.version).tags
            for c in (r.challenger, r.champion)]
    line = compare_line(speed_of(tags[0]), speed_of(tags[1]))
    machines = {t.get(HARDWARE_TAG) for t in tags}
    if line and len(machines) > 1:
        line += " (measured on different machines: compare with care)"
    return line


def cmd_rollback(args) -> int:
    quiet_mlflow()
    from components.registry import rollback

    cfg, tracker = _tracking(args)
    new, old = rollback(tracker, args.model, _policy(cfg), _echo,
                        cfg.tracking.experiment_name)
    print(f"models:/{args.model}@champion -> version {new}"
          + (f" (previous-champion -> {old})" if old else ""))
    return 0


def cmd_approve(args) -> int:
    quiet_mlflow()
    from components.registry import approve

    cfg, tracker = _tracking(args)
    new, old = approve(tracker, args.model, args.version, args.by, _policy(cfg), _echo,
                       cfg.tracking.experiment_name)
    print(f"models:/{args.model}@champion -> version {new} (approved by {args.by})"
          + (f" (previous-champion -> {old})" if old else ""))
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


# Mistakes a user can fix, or a state of the world they can change (a server down): one line,
# no traceback. Named, not imported: an exception of a module that was never imported cannot
# have been raised, and importing them all would cost an error seconds of torch and MLflow.
_USER_ERRORS = (
    ("components.data.ingest", "DataError"),
    ("components.evaluation.evaluate", "NoUsableTrialError"),
    ("components.models.transfer", "WeightsNotFoundError"),
    ("components.registry", "RegistryError"),
    ("components.registry", "PromotionError"),
    ("components.registry.hooks", "HookError"),
    ("components.storage", "StorageError"),
    ("components.tracking", "TrackingError"),
    ("components.tracking", "JournalError"),
    ("components.tuning.plan", "ResourceError"),
    ("pipelines.training", "PipelineFailed"),
)


def _user_errors() -> tuple[type[BaseException], ...]:
    found: list[type[BaseException]] = [FileNotFoundError, LookupError, ConnectionError]
    for module, name in _USER_ERRORS:
        if module in sys.modules:
            found.append(getattr(sys.modules[module], name))
    return tuple(found)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # Positionals after an option (`predict DIR --tracking-uri U registry.x=y`) belong to the
    # command's own positional list, as a user reads the line.
    rest = "paths" if hasattr(args, "paths") else "overrides"
    if extra and hasattr(args, rest) and not any(a.startswith("-") for a in extra):
        setattr(args, rest, [*getattr(args, rest), *extra])
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    debug = args.debug or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    from pipelines.interrupt import Interrupted

    try:
        return COMMANDS[args.command](args)
    except ConfigError as e:
        _report(f"config error: {e}", debug)
        return EXIT_CONFIG
    except Interrupted as e:
        pipeline_id = getattr(e, "pipeline_id", None)
        if getattr(e, "extension", False):
            _report(f"interrupted by {e}: the extension of run {pipeline_id} stopped and "
                    "registered nothing; the run keeps its finished sweep and version; "
                    f"continue the extension with: visiontune run --resume {pipeline_id}",
                    debug)
            return e.exit_code
        _report(f"interrupted by {e}" + (
            f": run {pipeline_id} is recorded as KILLED, nothing was registered; continue it "
            f"with: visiontune run --resume {pipeline_id}" if pipeline_id else ""), debug)
        return e.exit_code
    except KeyboardInterrupt:
        _report("interrupted", debug)
        return 130
    except Exception as e:
        known = isinstance(e, _user_errors())
        line = first_line(e, None)
        text = line if known else (f"{type(e).__name__}: {line} (run with --debug or "
                                   f"{DEBUG_ENV}=1 for the traceback)")
        _report(f"error: {text}", debug)
        return EXIT_FAILED


def _report(text: str, debug: bool) -> None:
    if debug:
        traceback.print_exc()
    print(f"visiontune: {text}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
