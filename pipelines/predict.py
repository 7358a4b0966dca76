"""`visiontune predict`: classify image files, folders or object-storage prefixes with a
registered model, in this process or (`--ray`, or automatically from `RAY_ABOVE` images on) as
a Ray Data job over the cluster. See components/inference/ for the engines (`local.py`,
`ray_data.py`) and the output file (`output.py`)."""

from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile
from pathlib import Path

from components.errors import ConfigError, MissingPathError, UserError, first_line

# From this many images on, `predict` without --ray/--no-ray runs on Ray: below it, starting
# Ray and loading the model in every actor costs more than the actors save (docs/serving.md,
# "Many images: `predict --ray`", has the measurement this is set from).
RAY_ABOVE = 20_000
RAY_ABOVE_ENV = "VISIONTUNE_PREDICT_RAY_ABOVE"   # sets it for a shell, a job or a cluster
MAX_SKIP_LINES = 20          # unreadable files named one by one; past that, only counted
_ALIAS_URI = re.compile(r"^models:/(?P<name>[^/@]+)@(?P<alias>[^/@]+)$")


def ray_above() -> int:
    value = os.environ.get(RAY_ABOVE_ENV, "")
    try:
        return int(value) if value.strip() else RAY_ABOVE
    except ValueError:
        raise ConfigError(f"{RAY_ABOVE_ENV}={value!r} is not a number of images") from None


def resolve_model_uri(model_uri: str) -> tuple[str, str]:
    """`models:/NAME@ALIAS` -> (`models:/NAME/VERSION`, 'models:/NAME/VERSION (alias ALIAS)'):
    every image of one job is classified by one version, even if the alias moves meanwhile.
    Other URIs are used as given."""
    m = _ALIAS_URI.match(model_uri)
    if not m:
        return model_uri, model_uri
    from mlflow import MlflowClient

    version = MlflowClient().get_model_version_by_alias(m["name"], m["alias"]).version
    pinned = f"models:/{m['name']}/{version}"
    return pinned, f"{pinned} (alias {m['alias']})"


def run_predict(args) -> int:
    from pipelines.console import console, quiet_mlflow

    # Usage mistakes first: before MLflow is imported or any file is read
    for flag, value in (("--workers", args.workers), ("--batch-size", args.batch_size)):
        if value is not None and value < 1:
            raise ConfigError(f"{flag} must be at least 1, got {value}")
    if args.output and Path(args.output).is_dir():
        raise ConfigError(f"--output {args.output} is a folder; give a file name "
                          f"(.csv, or .parquet)")
    ray_above()   # a bad $VISIONTUNE_PREDICT_RAY_ABOVE, likewise
    if not args.verbose:
        quiet_mlflow()   # before MLflow is imported
    else:
        console.verbose = True
    import mlflow
    from mlflow.exceptions import MlflowException

    from components.config import check_no_credentials
    from components.inference.local import expand_paths
    from pipelines.compose import load_config
    from pipelines.interrupt import SignalGuard

    check_no_credentials("--tracking-uri", args.tracking_uri)
    check_no_credentials("--address", args.address)
    overrides = [p for p in args.paths if _OVERRIDE.match(p) and not os.path.exists(p)]
    cfg = load_config(overrides, args.config)
    uri = args.tracking_uri or cfg.tracking.uri
    mlflow.set_tracking_uri(uri)
    paths = expand_paths([p for p in args.paths if p not in overrides])
    if not paths:
        raise MissingPathError(f"no image files in {' '.join(args.paths)}")
    # --ray/--no-ray decide; an --address means the cluster; else the number of images
    on_ray = args.ray if args.ray is not None else \
        bool(args.address) or len(paths) >= ray_above()

    with tempfile.TemporaryDirectory(prefix="visiontune-predict-") as tmp, SignalGuard():
        try:
            pinned, described = resolve_model_uri(args.model)
            _check_champion(args.model, pinned, uri, cfg.registry.require_promotion_record)
            local = mlflow.artifacts.download_artifacts(artifact_uri=pinned, dst_path=tmp)
        except MlflowException as e:
            raise UserError(f"cannot load {args.model} from {uri}: "
                            f"{first_line(e, None)}") from None
        try:
            _verify_code(pinned, local)   # code changed in the artifact store: not run
            _check(local)  # a model visiontune cannot classify with: one line, before any file
        except ValueError as e:
            raise UserError(f"cannot classify with {args.model}: {e}") from None
        return _classify(args, local, described, paths, on_ray, console)


_VERSION_URI = re.compile(r"^models:/(?P<name>[^/@]+)/(?P<version>\d+)$")
_OVERRIDE = re.compile(r"^[a-z_]+\.[a-z_.]+=")   # registry.require_promotion_record=true


def _check_champion(model_uri: str, pinned: str, tracking_uri: str, require: bool) -> None:
    """`models:/NAME@champion` must have got there by a recorded promotion or rollback: one
    warning line, or refused with registry.require_promotion_record=true."""
    from components.registry import CHAMPION, check_champion
    from components.tracking import Tracker

    m, v = _ALIAS_URI.match(model_uri), _VERSION_URI.match(pinned)
    if m and v and m["alias"] == CHAMPION:
        check_champion(Tracker(tracking_uri), m["name"], v["version"], require,
                       lambda line: print(f"visiontune: {line}", file=sys.stderr))


def _verify_code(model_uri: str, local_model: str) -> None:
    """A registered version's code files must be those recorded at registration (a version
    from before the tag, or a URI that is not a registered version, has nothing to check)."""
    m = _VERSION_URI.match(model_uri)
    if not m:
        return
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from components.serving import CODE_TAG, verify_code

    try:
        tags = MlflowClient().get_model_version(m["name"], m["version"]).tags
    except MlflowException as e:
        raise ValueError(f"cannot read {m['name']} version {m['version']}'s tags: "
                         f"{str(e).strip().splitlines()[0] if str(e).strip() else e}") from None
    verify_code(local_model, tags.get(CODE_TAG), f"{m['name']} version {m['version']}")


def _check(local_model: str) -> None:
    from mlflow.models import Model

    from components.inference.formats import check_model_format

    info = Model.load(local_model)
    check_model_format(info.metadata or {}, info.flavors)


def _classify(args, local_model: str, described: str, paths: list[str], on_ray: bool,
              console) -> int:
    import components
    from components.inference import output, ray_data
    from components.inference.local import local_batches
    from pipelines.console import Progress

    where = "in this process"
    log_path = None
    if on_ray:
        address = args.address or os.environ.get("RAY_ADDRESS") or None
        where = f"on Ray ({'the cluster at ' + address if address else 'a local Ray'})"
        if not console.verbose:
            log_path = Path(tempfile.mkdtemp(prefix="visiontune-predict-")) / "ray.log"
    err = sys.stderr
    print(f"predict: {len(paths):,} images with {described}, {where}" +
          (f"; Ray's own output: {log_path} (--verbose shows it here)" if log_path else ""),
          file=err, flush=True)
    skipped = []

    def on_skipped(path: str, reason: str) -> None:
        skipped.append(path)
        if len(skipped) <= MAX_SKIP_LINES:
            print(f"visiontune: skipped {path}: {reason}", file=console.stderr(), flush=True)

    writer = None
    try:
        if on_ray:
            from components.cluster import ray_session

            archive = ray_data.pack_model(local_model)
            with console.ray_output_to(log_path):
                progress = Progress("predict:", len(paths), stream=console.stderr())
                # This code travels with the job: the nodes need torch and mlflow (the
                # model's own requirements), not visiontune.
                code = {"py_modules": [str(Path(components.__file__).resolve().parent)],
                        "excludes": ["__pycache__/"]}
                with ray_session(address, runtime_env=code if address else None):
                    writer = output.PredictionWriter(args.output, console.stdout())
                    workers = min(args.workers or ray_data.default_workers(), len(paths))
                    print(f"predict: {workers:,} Ray Data workers (1 CPU each) load the model",
                          file=console.stderr(), flush=True)
                    with contextlib.closing(ray_data.ray_batches(
                            archive, paths, workers, args.batch_size)) as batches:
                        classified = output.consume(batches, writer, progress, on_skipped)
                timing = progress.finish()
        else:
            import mlflow

            progress = Progress("predict:", len(paths))
            model = mlflow.pyfunc.load_model(local_model)
            writer = output.PredictionWriter(args.output)
            classified = output.consume(local_batches(model, paths, args.batch_size), writer,
                                        progress, on_skipped)
            timing = progress.finish()
    except BaseException:
        if writer is not None and writer.partial is not None:
            writer.close(complete=False)
            print(f"visiontune: {writer.rows:,} of {len(paths):,} predictions so far are in "
                  f"{writer.partial} (it becomes {args.output} only when every image is done)",
                  file=err, flush=True)
        raise
    writer.close(complete=True)
    if len(skipped) > MAX_SKIP_LINES:
        print(f"visiontune: skipped {len(skipped) - MAX_SKIP_LINES:,} more unreadable files",
              file=err)
    if not classified:
        hint = (" (with --ray the nodes read the files: local paths must exist on every node)"
                if on_ray else "")
        print(f"visiontune: error: none of the {len(paths)} files could be read as an "
              f"image{hint}", file=err)
        return 1
    print(f"predict: {timing}, {classified:,} classified"
          + (f", {len(skipped):,} unreadable" if skipped else "")
          + (f" -> {args.output}" if args.output else ""), file=err)
    return 0

