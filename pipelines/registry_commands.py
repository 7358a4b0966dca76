"""The registry commands: `promote` (the paired comparison, then the champion's move),
`approve` (a promotion that waited for its approver) and `rollback`."""

from __future__ import annotations

from components.config import ConfigError
from components.evaluation.paired import DEFAULT_RESAMPLES
from pipelines.cli_help import add_config_args
from pipelines.console import quiet_mlflow


def add_registry_commands(sub) -> None:
    """promote, approve and rollback."""
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
    add_config_args(pr)
    ap = sub.add_parser("approve", help="move champion to a version whose promotion waits for "
                                        "approval; who approved is recorded")
    ap.add_argument("--model", required=True)
    ap.add_argument("--version", required=True)
    ap.add_argument("--by", required=True, metavar="NAME", help="who approves")
    add_config_args(ap)
    rb = sub.add_parser("rollback", help="move champion back to previous-champion (or to the "
                                         "last recorded champion, if it was moved by hand)")
    rb.add_argument("--model", required=True)
    add_config_args(rb)


def _tracking(args):
    from components.tracking import Tracker, bound_http_retries
    from pipelines.compose import load_config

    bound_http_retries()  # a server that went away fails in seconds, not minutes
    cfg = load_config(args.overrides, args.config)
    return cfg, Tracker(cfg.tracking.uri)


EXIT_NOT_PROMOTED = 3
EXIT_PENDING_APPROVAL = 4   # shown better, nothing moved yet: `promote && deploy` must not go on


def cmd_promote(args) -> int:
    quiet_mlflow()  # the decision is the story here
    if not 0.5 <= args.confidence < 1:
        raise ConfigError(f"--confidence={args.confidence} must be in [0.5, 1), e.g. 0.95")
    if args.non_inferior is not None and not 0 < args.non_inferior < 1:
        raise ConfigError(f"--non-inferior={args.non_inferior} is a margin of F1 in (0, 1), "
                          f"e.g. 0.01")
    if args.resamples < DEFAULT_RESAMPLES:
        raise ConfigError(f"--resamples={args.resamples}: at least {DEFAULT_RESAMPLES:,}")
    from components.config import check_no_credentials

    check_no_credentials("--data", args.data)   # it is recorded with the decision
    from components.registry import Evidence, promote
    from components.ui_links import review_links

    cfg, tracker = _tracking(args)
    reg = cfg.registry
    evidence = Evidence(min_images=reg.min_images, max_comparisons=reg.max_comparisons,
                        near_copy_distance=cfg.data.near_copy_distance,
                        max_class_drop=reg.max_class_drop)
    approver = args.approve_by or ("any" if reg.approval == "required" else None)
    r = promote(tracker, args.model, args.version, data=args.data, confidence=args.confidence,
                min_gain=reg.min_f1_gain, non_inferior=args.non_inferior,
                resamples=args.resamples, seed=args.seed, force=args.force,
                dry_run=args.dry_run, experiment_name=cfg.tracking.experiment_name,
                evidence=evidence, policy=_policy(cfg, approver))
    for line in promotion_lines(r):
        print(line)
    speed = speed_comparison(tracker, args.model, r)
    if speed:
        print(f"  {'trade-off: ' if args.non_inferior is not None else ''}{speed}")
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
    if r.awaiting:
        return EXIT_PENDING_APPROVAL
    return 0 if r.promote else EXIT_NOT_PROMOTED


def promotion_lines(r) -> list[str]:
    """The evidence, as the console shows it before the verdict."""
    from components.registry.promotion_record import evidence_lines

    if r.paired is None:
        return []
    lines = [f"  {line}" for line in evidence_lines(r)]
    if r.left_out:
        lines.append(f"  {len(r.left_out):,} images could not be read by a model and were "
                     f"left out (first: {r.left_out[0][0]}: {r.left_out[0][1]})")
    return lines


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
    new, old = rollback(tracker, args.model, _policy(cfg), cfg.tracking.experiment_name)
    print(f"models:/{args.model}@champion -> version {new}"
          + (f" (previous-champion -> {old})" if old else ""))
    return 0


def cmd_approve(args) -> int:
    quiet_mlflow()
    from components.registry import approve

    cfg, tracker = _tracking(args)
    new, old = approve(tracker, args.model, args.version, args.by, _policy(cfg),
                       cfg.tracking.experiment_name)
    print(f"models:/{args.model}@champion -> version {new} (approved by {args.by})"
          + (f" (previous-champion -> {old})" if old else ""))
    return 0


