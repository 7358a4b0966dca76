"""A disk that fills under `ray.storage_path` mid-sweep: a real small tmpfs, filled by the test
while a trial trains. The run stops with one line naming the path and its free space, nothing
is registered, and once space is made `visiontune run --resume ID` finishes the record, also
when the fill tore Ray Train's list of a run's checkpoints, or Tune's saved state of the
sweep (its trials and its grid generator's place in the grid)."""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
from pathlib import Path

import pytest

from components.training.checkpoint import SNAPSHOT_FILE
from components.tuning.sweep_state import COPY_FILE
from tests.faults.test_faults import _assert_no_process_left, _pipeline_id

pytestmark = [pytest.mark.slow, pytest.mark.faults]


@pytest.fixture
def small_disk(tmp_path):
    """A 64 MB tmpfs (root can mount one; elsewhere the test cannot make a disk fill)."""
    mount = tmp_path / "storage"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {made.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def _fill(folder: Path) -> Path:
    """Write until the disk says it is full; returns the ballast file."""
    ballast = folder / "ballast.bin"
    chunk = b"\0" * (1 << 20)
    with open(ballast, "wb", buffering=0) as f:   # unbuffered: close has nothing to flush
        with contextlib.suppress(OSError):
            while True:
                f.write(chunk)
        with contextlib.suppress(OSError):
            while True:   # the last bytes
                f.write(b"\0" * 4096)
    probe = os.statvfs(folder)
    assert probe.f_bavail * probe.f_frsize < 64 * 1024
    return ballast


def _stopped_by_a_full_disk(workspace, small_disk, listed: bool = False):
    """The first run, stopped by the disk filling while a trial trains (with `listed`: a
    trial whose Ray Train checkpoint list exists, i.e. past its first checkpoint, which comes
    after the epoch's MLflow record); space made again. Returns (the parent run, the pipeline
    id, the id of a trial the fill stopped)."""
    run = workspace.start("run", "--config", str(workspace.config),
                          f"ray.storage_path={small_disk}")

    def training_to_fill():
        kid = workspace.a_trial_mid_training()
        if kid is None or not listed:
            return kid
        pipeline_id = workspace.parent().data.tags["visiontune.pipeline_id"]
        return kid if (small_disk / pipeline_id / "train" / kid.data.tags["visiontune.trial_id"]
                       / SNAPSHOT_FILE).is_file() else None

    training = workspace.wait_for(training_to_fill, run)
    parent = workspace.parent()
    ballast = _fill(small_disk)
    code = run.wait(timeout=300)
    out = run.output()
    assert code == 1, out[-4000:]
    last = out.strip().splitlines()[-1]
    assert last.startswith(f"visiontune: error: no space left under ray.storage_path="
                           f"{small_disk} (free: "), last
    assert "Traceback" not in out.split("[visiontune] tune ...")[0]
    pipeline_id = _pipeline_id(last)
    assert workspace.versions() == []
    assert workspace.client().get_run(parent.info.run_id).info.status in ("FAILED", "KILLED")
    _assert_no_process_left(run.pid)
    ballast.unlink()
    # The trial the fill stopped runs again on resume: under load the one seen training may
    # have finished before the disk filled, and the next one was stopped instead.
    unfinished = [k.data.tags["visiontune.trial_id"]
                  for k in workspace.children(parent.info.run_id) if k.info.status != "FINISHED"]
    assert unfinished, f"no trial was stopped by the fill (seen training: {training.info.run_name})"
    with_list = [t for t in unfinished if (small_disk / pipeline_id / "train" / t /
                                           SNAPSHOT_FILE).is_file()]
    return parent, pipeline_id, (with_list or unfinished)[0]


def test_a_full_disk_under_the_storage_path_stops_in_one_line_and_resume_finishes(
        workspace, small_disk):
    parent, pipeline_id, trial_id = _stopped_by_a_full_disk(workspace, small_disk, listed=True)
    # The fill tears Ray Train's checkpoint list (rewritten in place at each report) in about
    # one run in three here, and Ray then failed the trial at every restart. Tear it as the
    # fill does, every time, so the resume below always crosses that path: the list of the
    # trial the fill stopped (under load the first trial may have finished before it, and
    # a finished trial does not run again).
    listed = small_disk / pipeline_id / "train" / trial_id / SNAPSHOT_FILE
    # (a trial stopped at its first checkpoint has no list yet: the fill leaves it empty)
    assert listed.parent.is_dir(), sorted(str(p) for p in small_disk.rglob("*"))[:40]
    listed.write_bytes(b"")
    resumed = workspace.run("run", "--resume", pipeline_id)
    assert resumed.returncode == 0, resumed.stdout[-4000:]
    workspace.assert_complete(parent.info.run_id)
    # The resume crossed the torn list: visiontune moved it aside (`.torn`, for a post-mortem)
    # and continued from the newest checkpoint that reads back, and said so.
    assert (listed.parent / (SNAPSHOT_FILE + ".torn")).read_bytes() == b""
    assert "checkpoint list was torn" in (small_disk / pipeline_id / "ray.log").read_text()


def test_a_full_disk_that_tore_tunes_sweep_state_resumes_every_planned_trial(
        workspace_in_trial, small_disk):
    """Tune copies its saved state over the files under the storage path in place; the fill
    tore them once (under load): the resume then ran one trial with an empty config and
    recorded a finished sweep with half its grid missing. Tear both as a full disk does (the
    generator's state emptied, the trials' state cut mid-JSON): without the copy visiontune
    keeps, the resume refuses in one line and changes nothing; with it, every planned trial
    is run, each once, with its own parameters. Tune's state is the same whichever way a trial
    trains: here each trains in its trial's process (Ray Train's list: the test above)."""
    workspace = workspace_in_trial
    parent, pipeline_id, _ = _stopped_by_a_full_disk(workspace, small_disk)
    # what the resume must run again: every trial the fill stopped (under load the other one
    # may have finished before it)
    stopped = {k.data.params["train.optimizer"] for k in workspace.children(parent.info.run_id)
               if k.info.status != "FINISHED"}
    exp = small_disk / pipeline_id
    generator = next(exp.glob("basic-variant-state-*.json"))
    trials = next(exp.glob("experiment_state-*.json"))
    generator.write_bytes(b"")
    trials.write_bytes(trials.read_bytes()[: trials.stat().st_size // 2])
    torn = {p: p.read_bytes() for p in (generator, trials)}
    kept = exp / COPY_FILE
    kept.rename(exp / "aside.zip")

    refused = workspace.run("run", "--resume", pipeline_id)
    assert refused.returncode == 1, refused.stdout[-4000:]
    last = refused.stdout.strip().splitlines()[-1]
    assert last.startswith("visiontune: error: Tune's saved state of the sweep under "), last
    assert generator.name in last and "no intact copy" in last, last
    assert "Traceback" not in refused.stdout
    assert {p: p.read_bytes() for p in torn} == torn
    assert workspace.versions() == []
    assert workspace.client().get_run(parent.info.run_id).info.status == "FAILED"

    (exp / "aside.zip").rename(kept)
    resumed = workspace.run("run", "--resume", pipeline_id)
    out = resumed.stdout
    assert resumed.returncode == 0, out[-4000:]
    assert "Tune's saved state of the sweep was torn" in out, out[-4000:]
    started = re.findall(r"trial \d/2 \w+ started: (.*)", out)
    assert started and all(p.strip() for p in started), out[-4000:]
    assert all(optimizer in "".join(started) for optimizer in stopped), (stopped, out[-4000:])
    assert "ended because every planned trial ran" in out and "not started" not in out, out
    workspace.assert_complete(parent.info.run_id)
    assert (exp / (generator.name + ".torn")).read_bytes() == b""
