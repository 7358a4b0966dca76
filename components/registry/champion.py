"""Every move of `champion` is recorded and announced, and anything that uses the champion can
tell when it was moved another way.

MLflow lets anyone with write access move an alias (the UI, `set_registered_model_alias`),
with no trace. So each move by `promote`, `rollback`, `approve` or a model's first
registration also writes the registered-model tag `visiontune.champion_record` (which version,
by what, the run that holds why), under the alias lock. `champion_problem` compares the alias
with that record: a champion that does not match was moved outside visiontune. `predict`,
`serve` and `promote` say so in one line, and refuse it with
`registry.require_promotion_record=true`. Whoever can also rewrite the record tag is trusted
with the models (docs/serving.md, Security).

After a move, `announce` sends the signed hooks (`components.registry.hooks`) and records each
delivery's attempts on the run that moved it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from mlflow.exceptions import MlflowException
from requests.exceptions import RequestException

from components.errors import NotFoundError
from components.registry.hooks import DEFAULT_ATTEMPTS, SECRET_ENV, Delivery, check_hooks, deliver
from components.registry.registry import (
    RECORD_TAG,
    RegistryError,
    is_not_found,
    moved_by,
)
from components.tracking import Tracker, first_line
from components.ui_links import review_links

HOOKS_TAG = "visiontune.hooks"              # on the registered model: its own hook URLs


class UnrecordedChampion(RegistryError):
    """The champion was moved outside visiontune and the config requires a record."""


@dataclass(frozen=True)
class ChampionPolicy:
    """How `champion` may move and who hears of it (`registry.*` of the config)."""
    hooks: tuple[str, ...] = ()              # URLs, besides the model's own (HOOKS_TAG)
    hook_attempts: int = DEFAULT_ATTEMPTS
    require_record: bool = False             # refuse a champion moved outside visiontune
    approver: str | None = None              # the move waits for `approve` by them ("any")


def model_tags(tracker: Tracker, name: str) -> dict[str, str]:
    """The registered model's tags; LookupError when there is no such model."""
    try:
        return dict(tracker.client.get_registered_model(name).tags)
    except (MlflowException, RequestException) as exc:
        if is_not_found(exc):
            raise NotFoundError(f"no registered model {name!r} at {tracker.uri}") from None
        raise RegistryError(f"the model registry at {tracker.uri} failed while reading model "
                            f"{name}: {first_line(exc)}; no alias was moved") from exc


def recorded_champion(tracker: Tracker, name: str) -> dict | None:
    raw = model_tags(tracker, name).get(RECORD_TAG)
    try:
        return json.loads(raw) if raw else None
    except ValueError:
        return None


def champion_problem(tracker: Tracker, name: str, version: str) -> str | None:
    """None when `version`, now under `champion`, got there by a recorded move; else one line
    naming the version and how to fix it."""
    record = recorded_champion(tracker, name)
    if record is not None and str(record.get("version")) == str(version):
        return None
    if record is None:
        if _moved_before_the_record(tracker, name, str(version)):
            return None
        how = "no promotion or rollback of this model is recorded"
        fix = (f"`visiontune rollback --model {name}` puts back previous-champion, recorded; "
               f"or, without registry.require_promotion_record, promote a challenger "
               f"against it: every move from then on is recorded")
    else:
        how = (f"the last recorded move made version {record['version']} champion "
               f"({record.get('by', '?')}, {record.get('at', '?')})")
        fix = (f"restore version {record['version']} with `visiontune rollback --model "
               f"{name}`, then compare version {version} with `visiontune promote --model "
               f"{name} --version {version}`")
    return (f"models:/{name}@champion is version {version}, moved there outside visiontune "
            f"({how}): {fix}")


def _moved_before_the_record(tracker: Tracker, name: str, version: str) -> bool:
    """A model whose champion moved before visiontune kept the record tag: its version tags
    say how it got there (promoted, restored by rollback), or it is the model's first version
    (a first registration makes it champion)."""
    mv = tracker.client.get_model_version(name, version)
    if (mv.tags or {}).get("promotion.decision", "").startswith(("promoted",
                                                                  "restored by rollback")):
        return True
    found = tracker.client.search_model_versions(f"name = '{name}'")
    return bool(found) and min(int(v.version) for v in found) == int(version)


def check_champion(tracker: Tracker, name: str, version: str, require: bool, warn) -> bool:
    """Whether `version`, under `champion`, may be used: a recorded move, or (a warning line
    through `warn`) an unrecorded one when the config does not require the record. Raises
    UnrecordedChampion when it does."""
    problem = champion_problem(tracker, name, version)
    if problem is None:
        return True
    if require:
        raise UnrecordedChampion(f"{problem}; refusing it (registry.require_promotion_record"
                                 f"=true)")
    warn(f"warning: {problem}")
    return False


# ----------------------------------------------------------------------------- announce

def hook_urls(tracker: Tracker, name: str, policy: ChampionPolicy) -> list[str]:
    """The config's `registry.hooks` and the model's own (tag `visiontune.hooks`, URLs
    separated by commas or spaces), once each, in that order; checked (a secret to sign with,
    http(s), no credentials in a URL) before anything moves."""
    own = model_tags(tracker, name).get(HOOKS_TAG, "")
    urls = [*policy.hooks, *own.replace(",", " ").split()]
    urls = list(dict.fromkeys(u.strip() for u in urls if u.strip()))
    check_hooks(urls, os.environ.get(SECRET_ENV))
    return urls


_DECISION_PARAMS = ("rule", "confidence", "f1_average", "data_fingerprint", "forced",
                    "comparison_number", "non_inferior_margin", "min_f1_gain")
_DECISION_METRICS = ("images", "f1_difference", "ci_low", "ci_high", "p_value", "floor",
                     "challenger_f1", "champion_f1", "mcnemar_p")
_DECISION_TAGS = ("promotion.decision", "promotion.reason", "promotion.approved_by")


def move_payload(tracker: Tracker, name: str, action: str, version: str, previous: str | None,
                 run_id: str) -> dict:
    """What a hook receives: the move, and the decision as the run that moved it records it
    (one source for promote, approve and rollback)."""
    run = tracker.client.get_run(run_id)
    d = run.data
    decision = {k: d.params[k] for k in _DECISION_PARAMS if k in d.params}
    decision.update({k: d.metrics[k] for k in _DECISION_METRICS if k in d.metrics})
    decision.update({k.removeprefix("promotion."): d.tags[k] for k in _DECISION_TAGS
                     if k in d.tags})
    links = review_links(tracker.uri, run.info.experiment_id, run_id, name, str(version))
    return {"model": name, "alias": "champion", "version": str(version),
            "previous_version": str(previous) if previous else None, "action": action,
            "decision": decision, "moved_by": moved_by(),
            "run": {"id": run_id, "experiment_id": run.info.experiment_id,
                    "url": links["run"]},
            "model_url": links.get("model")}


def announce(tracker: Tracker, name: str, urls: list[str], action: str, version: str,
             previous: str | None, run_id: str, policy: ChampionPolicy) -> list[Delivery]:
    """Send the move to every hook, signed, retried; then record each delivery's attempts on
    `run_id` (artifact `promotion/hooks.json`, metrics, tag `promotion.hooks`). The alias has
    already moved: a receiver that fails is reported and recorded, never undoes the move."""
    if not urls:
        return []
    event = "champion.rolled_back" if action == "rollback" else "champion.promoted"
    payload = move_payload(tracker, name, action, version, previous, run_id)
    deliveries = deliver(urls, event, payload, os.environ.get(SECRET_ENV, ""),
                         attempts=policy.hook_attempts)
    delivered = sum(d.delivered for d in deliveries)
    tracker.log_text(run_id, json.dumps([d.as_dict() for d in deliveries], indent=1),
                     "promotion/hooks.json")
    tracker.log_metrics(run_id, {"hook_deliveries": len(deliveries),
                                 "hook_delivered": delivered,
                                 "hook_attempts": sum(len(d.attempts) for d in deliveries)})
    tracker.set_tags(run_id, {"promotion.hooks": f"{delivered} of {len(deliveries)} delivered"})
    return deliveries
