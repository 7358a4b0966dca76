"""Tune's saved state of a sweep through a full disk (components.tuning.sweep_state), without
Ray running: the generator's copy of each save, torn files told from whole ones, the copy put
back before a resume, and a resume refused when there is no copy. The real thing, a disk
filled mid-sweep and the resume that finishes it, is tests/faults/test_disk.py."""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from types import SimpleNamespace

import pytest

from components.tuning.gate import GatedVariantGenerator
from components.tuning.sweep_state import (
    COPY_FILE,
    SweepStateTorn,
    reads_back,
    repair_before_restore,
    torn_files,
)
from pipelines.steps.tune import TrialsLost, check_every_trial_ran

SESSION = "2026-12-06_00-02-24"
STATE = f"experiment_state-{SESSION}.json"
SEARCHER = f"basic-variant-state-{SESSION}.json"


def _save(staging: Path, exp: Path, trials: int) -> GatedVariantGenerator:
    """What Tune does at each save: the experiment state, then the search algorithm's (here
    the real generator's own `save_to_dir`), then its copy to the storage path."""
    staging.mkdir(exist_ok=True)
    exp.mkdir(parents=True, exist_ok=True)
    (staging / STATE).write_text(json.dumps({"trial_data": [["{}", "{}"]] * trials}))
    gen = GatedVariantGenerator("vt-test", keep_at=str(exp), random_state=0, max_concurrent=1)
    gen.save_to_dir(str(staging), SESSION)
    for name in (STATE, SEARCHER):   # Tune's sync: a copy over the files in place
        (exp / name).write_bytes((staging / name).read_bytes())
    return gen


def test_a_whole_file_reads_back_a_cut_one_does_not():
    whole = pickle.dumps({"_iterators": [], "counter": 3}, protocol=5)
    assert reads_back(whole) and reads_back(b'{"trial_data": []}')
    assert not reads_back(b"")
    assert not reads_back(whole[: len(whole) // 2])
    assert not reads_back(b'{"trial_data": [["{\\"config\\"')


def test_each_save_keeps_a_copy_that_replaces_torn_state_before_a_resume(tmp_path, caplog):
    staging, exp = tmp_path / "staging", tmp_path / "storage" / "vt-test"
    _save(staging, exp, trials=1)
    assert (exp / COPY_FILE).is_file()
    whole = {n: (exp / n).read_bytes() for n in (STATE, SEARCHER)}
    assert repair_before_restore(str(exp)) is False   # nothing torn: nothing touched

    # the full disk: the searcher's state emptied, the experiment state cut mid-JSON
    (exp / SEARCHER).write_bytes(b"")
    (exp / STATE).write_bytes(whole[STATE][:20])
    assert torn_files(str(exp)) == [SEARCHER, STATE]
    with caplog.at_level("INFO"):
        assert repair_before_restore(str(exp)) is True
    assert {n: (exp / n).read_bytes() for n in (STATE, SEARCHER)} == whole
    assert (exp / (SEARCHER + ".torn")).read_bytes() == b""
    assert torn_files(str(exp)) == []
    assert "continuing from its last intact copy" in caplog.text


def test_a_copy_that_cannot_be_written_leaves_the_previous_one(tmp_path):
    staging, exp = tmp_path / "staging", tmp_path / "vt-test"
    _save(staging, exp, trials=1)
    before = (exp / COPY_FILE).read_bytes()
    (exp / (COPY_FILE + ".tmp")).mkdir()   # the write fails, as on a full disk
    _save(staging, exp, trials=2)          # does not raise: Tune's own save goes on
    assert (exp / COPY_FILE).read_bytes() == before
    # the copy is one pair: experiment state and generator state of the same save
    (exp / SEARCHER).write_bytes(b"")
    repair_before_restore(str(exp))
    assert len(json.loads((exp / STATE).read_text())["trial_data"]) == 1


def test_torn_state_without_a_copy_refuses_the_resume_and_changes_nothing(tmp_path):
    exp = tmp_path / "vt-test"
    _save(tmp_path / "staging", exp, trials=1)
    (exp / COPY_FILE).unlink()
    (exp / SEARCHER).write_bytes(b"")
    with pytest.raises(SweepStateTorn) as e:
        repair_before_restore(str(exp))
    line = str(e.value)
    assert "\n" not in line and SEARCHER in line and "start the sweep over" in line
    assert (exp / SEARCHER).read_bytes() == b"" and not (exp / (SEARCHER + ".torn")).exists()


def test_a_sweep_that_ends_without_planned_trials_and_no_rule_is_refused(tmp_path):
    log = tmp_path / "ray.log"
    check_every_trial_ran(SimpleNamespace(reason=None), 2, 2, log)
    check_every_trial_ran(SimpleNamespace(reason="the budget is spent"), 4, 2, log)
    with pytest.raises(TrialsLost, match="1 of its 2 planned trial"):
        check_every_trial_ran(SimpleNamespace(reason=None), 2, 1, log)
