"""An extension interrupted as a terminal's Ctrl-C does, then continued with `visiontune run
--resume ID` alone: the run stays FINISHED meanwhile (its version is the one it finished with),
the extension's trials finish, the first sweep's stay as they were, and nothing is registered
from the interrupted attempt."""

from __future__ import annotations

import os
import re
import signal

import pytest

from tests.faults.conftest import EPOCHS, TRIALS
from tests.faults.test_faults import _assert_no_process_left, _driver_lines

pytestmark = [pytest.mark.slow, pytest.mark.faults]


def test_ctrl_c_of_an_extension_then_resume_finishes_it(workspace_in_trial):
    ws = workspace_in_trial
    first = ws.run("run", "--config", str(ws.config))
    assert first.returncode == 0, first.stdout[-4000:]
    pipeline_id = re.findall(r"visiontune run (vt-[0-9a-z-]+) finished", first.stdout)[-1]
    parent = ws.parent()
    before = {k.info.run_id: ws.epochs_logged(k.info.run_id)
              for k in ws.children(parent.info.run_id)}
    assert len(before) == TRIALS

    # the grid once more (search.num_samples=2): two more trials, both mid-training at Ctrl-C
    ext = ws.start("run", "--extend", pipeline_id, "search.num_samples=2")

    def a_new_trial_mid_training():
        for kid in ws.children(parent.info.run_id):
            if kid.info.run_id not in before and kid.info.status == "RUNNING" \
                    and 1 <= len(ws.epochs_logged(kid.info.run_id)) <= EPOCHS - 3:
                return kid
        return None

    ws.wait_for(a_new_trial_mid_training, ext)
    os.killpg(ext.pid, signal.SIGINT)
    assert ext.wait(timeout=120) == 130, ext.output()[-4000:]
    out = ext.output()
    assert "Traceback" not in _driver_lines(out)
    last = out.strip().splitlines()[-1]
    assert last == (f"visiontune: interrupted by SIGINT: the extension of run {pipeline_id} "
                    "stopped and registered nothing; the run keeps its finished sweep and "
                    f"version; continue the extension with: visiontune run --resume "
                    f"{pipeline_id}"), last
    # the run keeps the status its registered version came from
    stopped = ws.client().get_run(parent.info.run_id)
    assert stopped.info.status == "FINISHED"
    assert stopped.data.tags["visiontune.extension_state"] == "stopped"
    assert len(ws.versions()) == 1               # nothing registered from the attempt
    _assert_no_process_left(ext.pid)

    resumed = ws.run("run", "--resume", pipeline_id)
    assert resumed.returncode == 0, resumed.stdout[-4000:]
    assert "tune-x1" in resumed.stdout, resumed.stdout[-4000:]
    record = ws.client().get_run(parent.info.run_id)
    assert record.info.status == "FINISHED"
    assert record.data.tags["visiontune.step.tune-x1"] == "done"
    assert record.data.tags["visiontune.extension_state"] == "done"
    kids = ws.children(parent.info.run_id)
    assert len(kids) == 2 * TRIALS
    for kid in kids:
        assert kid.info.status == "FINISHED", kid.info.run_name
        assert ws.epochs_logged(kid.info.run_id) == list(range(1, EPOCHS + 1))
    for run_id, epochs in before.items():        # the first sweep's trials as they were
        assert ws.epochs_logged(run_id) == epochs
    assert 1 <= len(ws.versions()) <= 2
