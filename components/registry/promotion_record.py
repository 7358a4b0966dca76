"""The record of a promotion: one MLflow run per `visiontune promote` (role `promotion`) with
both versions, the images (and those dropped because a version trained on them), both
models' per-image predictions, the decision's p-value, interval and floor, McNemar's accuracy
check, the decision and its reason; the tags on both versions that point at it (what the
version's page in the MLflow UI shows); and how many comparisons used the same images."""

from __future__ import annotations

import json
import time

from mlflow.exceptions import MlflowException

from components.registry.comparison import Candidate, PromotionResult
from components.tracking import ROLE_TAG, Tracker

ROLE = "promotion"
MODEL_NAME_TAG = "visiontune.model_name"
NOTE_TAG = "mlflow.note.content"


# ----------------------------------------------------------------------------- the record

def experiment_of(tracker: Tracker, c: Candidate, fallback: str) -> str:
    if c.run_id:
        try:
            return tracker.client.get_run(c.run_id).info.experiment_id
        except MlflowException:
            pass
    return tracker.ensure_experiment(fallback)


def comparisons_on(tracker: Tracker, experiment_id: str, name: str, fingerprint: str) -> int:
    """Promotions of model `name` recorded on images with this fingerprint (dry runs too:
    every look at the same test images spends their evidence)."""
    runs = tracker.client.search_runs(
        [experiment_id], f"tags.`{ROLE_TAG}` = '{ROLE}' and tags.`{MODEL_NAME_TAG}` = "
                         f"'{name}' and params.data_fingerprint = '{fingerprint}'",
        max_results=1000)
    return len(runs)


def evidence_lines(r: PromotionResult) -> list[str]:
    """The numbers of the decision, in words: the console and the run's description."""
    from components.evaluation.paired import floor_line

    p = r.paired
    seed = f"seed {p.seed}" + (" (set)" if p.seed_set else " (derived from the versions and "
                                                            "the images)")
    lines = [f"{p.average} F1: challenger {p.f1_challenger:.4f}, champion {p.f1_champion:.4f}, "
             f"difference {p.difference:+.4f}, {p.confidence:.0%} interval {p.interval()} "
             f"({p.resamples:,} paired resamples, {seed})",
             f"decision's test: paired permutation test of the {p.average} F1 difference, "
             f"p = {p.p_value:.4g} ({p.rule})",
             floor_line(p),
             f"accuracy check (McNemar, not the decision): {p.challenger_only} images only the "
             f"challenger gets right, {p.champion_only} only the champion; p = "
             f"{p.mcnemar_p:.4g}, favours {p.mcnemar_favours}"]
    drops = [c for c in p.per_class if c["difference"] < 0]
    if drops:
        worst = min(drops, key=lambda c: c["difference"])
        lines.append(f"largest per-class drop: {_class(r, worst)} {worst['difference']:+.4f} F1 "
                     f"(interval [{worst['ci_low']:+.4f}, {worst['ci_high']:+.4f}])")
    if r.dropped:
        lines.append(f"{len(r.dropped):,} images left out because a version trained or was "
                     f"selected on them (promotion/dropped.tsv)")
    return lines


def _class(r: PromotionResult, row: dict) -> str:
    i = row["class"]
    return r.class_names[i] if i < len(r.class_names) else str(i)


def note(name: str, r: PromotionResult, dry_run: bool) -> str:
    champ = f"v{r.champion.version}" if r.champion else "no champion"
    verdict = f"dry run, would {'promote' if r.promote else 'reject'}" if dry_run else r.decision
    lines = [f"**Promotion of {name} v{r.challenger.version} over {champ}: {verdict}**", "",
             f"- Reason: {r.reason}"]
    if r.paired is not None:
        lines += [f"- Images: {r.paired.n:,} from {r.images.source} (fingerprint "
                  f"`{r.images.fingerprint[:12]}`), comparison #{r.comparison} on them"]
        lines += [f"- {line}" for line in evidence_lines(r)]
        lines += ["- Artifacts: `promotion/predictions.csv` (both models, every image), "
                  "`promotion/bootstrap.png`, `promotion/decision.json`, "
                  "`promotion/per_class.csv`, `promotion/dropped.tsv`"]
    return "\n".join(lines) + "\n"


def record_promotion(tracker: Tracker, experiment_id: str, name: str, r: PromotionResult, *,
                     dry_run: bool, force: bool, settings: dict) -> str:
    """The promotion run: both versions, the images, both models' per-image predictions,
    the 2x2 table, the p-value, the interval, the decision and its reason."""
    import matplotlib.pyplot as plt

    from components.evaluation.paired import plot_bootstrap

    champ = r.champion.version if r.champion else ""
    run_id = tracker.create_run(
        experiment_id, f"promote v{r.challenger.version} vs v{champ or '-'}",
        {ROLE_TAG: ROLE, MODEL_NAME_TAG: name, "promotion.decision":
            ("would promote" if r.promote else "rejected") if dry_run else r.decision,
         "promotion.reason": r.reason[:5000], "promotion.dry_run": str(dry_run).lower(),
         NOTE_TAG: note(name, r, dry_run)})
    try:
        params = {"model_name": name, "challenger_version": r.challenger.version,
                  "champion_version": champ, "forced": force, "dry_run": dry_run, **settings}
        if r.images is not None:
            params.update(data_source=r.images.source, data_location=r.images.location,
                          data_fingerprint=r.images.fingerprint,
                          from_test_split=r.images.from_test_split,
                          images_left_out=len(r.left_out), images_dropped=len(r.dropped),
                          comparison_number=r.comparison)
        if r.paired is not None:
            p = r.paired
            params.update(rule=p.rule, threshold=p.threshold, f1_average=p.average,
                          classes=",".join(sorted(set(r.images.labels))), seed=p.seed,
                          seed_set=p.seed_set, resamples=p.resamples,
                          permutations=p.permutations)
        tracker.log_params(run_id, params)
        if r.paired is not None:
            _record_evidence(tracker, run_id, name, r)
            fig = plot_bootstrap(r.paired, f"{name}: v{r.challenger.version} vs v{champ}")
            tracker.log_figure(run_id, fig, "promotion/bootstrap.png")
            plt.close(fig)
        tracker.end_run(run_id, "FINISHED")
    except BaseException:
        try:
            tracker.end_run(run_id, "FAILED")
        except Exception:  # the store itself may be what failed
            pass
        raise
    return run_id


def _record_evidence(tracker: Tracker, run_id: str, name: str, r: PromotionResult) -> None:
    import pandas as pd

    p = r.paired
    tracker.log_metrics(run_id, {
        "images": p.n, "f1_difference": p.difference, "ci_low": p.ci_low, "ci_high": p.ci_high,
        "p_value": p.p_value, "mcnemar_p": p.mcnemar_p, "both_right": p.both_right,
        "challenger_only_right": p.challenger_only, "champion_only_right": p.champion_only,
        "both_wrong": p.both_wrong, "images_dropped": len(r.dropped),
        **({"floor": p.floor} if p.floor is not None else {}),
        **{f"seconds_{k}": v for k, v in r.seconds.items()}})
    dataset = f"{name}-promotion-images"
    for role, c, f1 in (("challenger", r.challenger, p.f1_challenger),
                        ("champion", r.champion, p.f1_champion)):
        if c.model_id:   # MLflow's lineage: this model's F1 on these images
            tracker.log_model_metrics(run_id, c.model_id, {f"{role}_f1": f1}, dataset,
                                      r.images.fingerprint)
        else:
            tracker.log_metrics(run_id, {f"{role}_f1": f1})
    frame = pd.DataFrame({"path": r.images.paths, "label": r.images.labels})
    tracker.log_datasets(run_id, [(dataset, "evaluation", frame)], r.images.location,
                         r.images.fingerprint)
    tracker.log_table(run_id, r.predictions, "promotion/predictions.csv")
    tracker.log_table(run_id, frame, "promotion/images.csv")
    tracker.log_text(run_id, json.dumps(
        {**p.as_dict(), "promote": r.promote, "reason": r.reason,
         "images_fingerprint": r.images.fingerprint, "images_source": r.images.source,
         "left_out": r.left_out[:1000]}, indent=1), "promotion/decision.json")
    tracker.log_text(run_id, "\n".join(f"{k}\t{v}" for k, v in r.left_out) or "(none)\n",
                     "promotion/left_out.tsv")
    tracker.log_text(run_id, "\n".join(f"{k}\t{v}" for k, v in r.dropped) or "(none)\n",
                     "promotion/dropped.tsv")
    if p.per_class:
        tracker.log_table(run_id, pd.DataFrame(
            [{**row, "class": _class(r, row)} for row in p.per_class]),
            "promotion/per_class.csv")


def tag_versions(tracker: Tracker, name: str, r: PromotionResult) -> None:
    """Each version's page shows its latest decision and the run that holds the evidence."""
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    common = {"promotion.run_id": r.run_id or "", "promotion.time": stamp,
              "promotion.challenger_version": r.challenger.version,
              "promotion.champion_version": r.champion.version if r.champion else "",
              "promotion.reason": r.reason[:5000]}
    if r.paired is not None:
        favours = r.paired.mcnemar_favours
        common.update({"promotion.p_value": f"{r.paired.p_value:.4g}",
                       "promotion.test": f"paired permutation, {r.paired.average} F1 "
                                         f"difference, {r.paired.rule}",
                       "promotion.accuracy_check": f"McNemar p={r.paired.mcnemar_p:.4g} "
                                                   f"(accuracy; favours {favours})",
                       "promotion.floor": "none" if r.paired.floor is None else
                                          f"{r.paired.floor:+.4f}",
                       "promotion.interval": f"{r.paired.interval()} at "
                                             f"{r.paired.confidence:.0%}",
                       "promotion.f1_difference": f"{r.paired.difference:+.4f}"})
    roles = [(r.challenger.version, "challenger", r.decision)]
    if r.champion is not None and r.champion.version != r.challenger.version:
        kept = (f"replaced by v{r.challenger.version}" if r.applied else
                f"kept (v{r.challenger.version} awaits approval)" if r.awaiting else
                f"kept (v{r.challenger.version} rejected)")
        roles.append((r.champion.version, "champion", kept))
    for version, role, decision in roles:
        for k, v in {**common, "promotion.role": role, "promotion.decision": decision}.items():
            tracker.client.set_model_version_tag(name, version, k, str(v))
