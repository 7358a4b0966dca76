"""The `visiontune` command line."""

from __future__ import annotations

import argparse
import sys

from components.config import ConfigError

EXIT_CONFIG = 2


def _config_help() -> str:
    from components.config import field_docs
    from pipelines.config import GROUPS, conf_dir, group_options, load_config

    lines = ["config groups (pick one with group=option):"]
    try:
        root = conf_dir()
        for g in GROUPS:
            lines.append(f"  {g:<10} {' | '.join(group_options(g, root))}")
        lines.append(f"  experiment files: {root / 'experiment'}/*.yaml (use --config)")
    except ConfigError as e:
        lines.append(f"  ({e})")
    try:
        values = load_config([], resolve=False)
        lines.append("\nconfig keys with the default config's values (override with key=value, "
                     "e.g. train.epochs=3):")
    except ConfigError:
        values = None
        lines.append("\nconfig keys (override with key=value, e.g. train.epochs=3):")
    for key, default, doc in field_docs(values=values):
        lines.append(f"  {key:<28} {default:<22} {doc}")
    return "\n".join(lines)


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
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser(
        "run", help="run the training pipeline (ingest, validate, split, tune, evaluate, "
                    "register)",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=_LazyEpilog())
    _add_config_args(run)
    run.add_argument("--resume", metavar="PIPELINE_ID",
                     help="continue an interrupted run (its id is printed at the start)")
    run.add_argument("--print-config", action="store_true",
                     help="print the resolved config and exit")
    return parser


class _LazyEpilog(str):
    """The key table needs torchvision's model list; build it only when --help prints it."""

    def __new__(cls):
        return super().__new__(cls, "")

    def __bool__(self):
        return True

    def __str__(self):
        return _config_help()

    def splitlines(self, *a, **k):
        return _config_help().splitlines(*a, **k)

    def __iter__(self):
        return iter(_config_help())


def cmd_run(args) -> int:
    import yaml

    from components.config import to_dict
    from pipelines.config import load_config
    from pipelines.training import run_training_pipeline, summary

    cfg = load_config(args.overrides, args.config)
    if args.print_config:
        print(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        return 0
    result = run_training_pipeline(cfg, resume=args.resume)
    print(summary(result))
    return 0


COMMANDS = {"run": cmd_run}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from components.data.validate import DataError
    from components.models.transfer import WeightsNotFoundError
    from components.tuning.plan import ResourceError

    try:
        return COMMANDS[args.command](args)
    except ConfigError as e:
        print(f"visiontune: config error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    except (DataError, WeightsNotFoundError, ResourceError, FileNotFoundError) as e:
        # What the user can fix gets one clear line, not a traceback.
        print(f"visiontune: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
