"""The sweep's Tune callbacks: closing the MLflow runs trials could not close, the console's
view of the sweep, stopping on request, and `SweepCallbacks`, which Tune is given instead of
them so that a restored sweep calls the live ones (see `_LIVE`)."""

from __future__ import annotations

import contextlib
import logging
import signal
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ray.tune import Callback

from components.tracking import Tracker
from components.tracking.journal import no_space
from components.tuning.gate import TrialShape, ended_status
from components.tuning.space import Axis, resolve_params

log = logging.getLogger(__name__)   # the console's lines (pipelines/console.py)


@dataclass
class TrackingTarget:
    tracker: Tracker
    experiment_id: str
    parent_run_id: str


class TrialRunCloser(Callback):
    """Closes child runs their trial could not close. A trial the scheduler stops is killed
    before its own code can end the run, also at its last epoch (ASHA stops at max_t);
    a crashed trial's process may be gone."""

    def __init__(self, target: TrackingTarget, shape: TrialShape):
        self.target = target
        self.shape = shape

    def _close(self, trial, status: str) -> None:
        t = self.target   # journaled while the server is away, like any write
        t.tracker.close_trial_run(t.experiment_id, t.parent_run_id, trial.trial_id, status)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._close(trial, ended_status(trial.last_result, self.shape.epochs_of(trial.config)))

    def on_trial_error(self, iteration, trials, trial, **info):
        self._close(trial, "FAILED")

    def on_experiment_end(self, trials, **info):
        for trial in trials:
            self._close(trial, "KILLED")


def _short(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


class ConsoleProgress(Callback):
    """The sweep for a person: a line when a trial starts (what it tries), a live line per
    epoch on a terminal (`status`: terminal-only, so a callable and not a log line), a line
    when it ends (status, best val F1, epochs, time) with the best so far, both logged. Tune
    calls it in the driver, where the console's handler is. Tune's own tables go to the log
    with the rest of Ray's output."""

    def __init__(self, status: Callable[[str], None], axes: list[Axis], sections: dict,
                 shape: TrialShape, num_trials: int):
        self.status = status
        self.axes, self.sections = axes, sections
        self.shape, self.num_trials = shape, num_trials
        self.number: dict[str, int] = {}
        self.started: dict[str, float] = {}
        self.best: tuple[float, str] | None = None

    def _name(self, trial) -> str:
        n = self.number.setdefault(trial.trial_id, len(self.number) + 1)
        return f"trial {n}/{self.num_trials} {trial.trial_id}"

    def _params(self, trial) -> str:
        params = resolve_params(trial.config or {}, self.axes, self.sections)
        return " ".join(f"{k.split('.')[-1]}={_short(v)}" for k, v in params.items())

    def on_trial_start(self, iteration, trials, trial, **info):
        import time

        self.started[trial.trial_id] = time.monotonic()
        log.info(f"  {self._name(trial)} started: {self._params(trial)}")

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if "val_f1" not in result:
            return
        self.status(f"  {self._name(trial)} epoch {int(result.get('epoch', 0))}/"
                    f"{self.shape.epochs_of(trial.config)}: val_f1 {result['val_f1']:.4f} (best "
                    f"{result.get('best_val_f1', result['val_f1']):.4f})")

    def _ended(self, trial, status: str, detail: str = "") -> None:
        import time

        m = trial.last_result or {}
        took = time.monotonic() - self.started.get(trial.trial_id, time.monotonic())
        f1 = m.get("best_val_f1")
        if f1 is not None and (self.best is None or f1 > self.best[0]):
            self.best = (f1, trial.trial_id)
        text = (f"  {self._name(trial)} {status}: best val_f1 "
                f"{'-' if f1 is None else f'{f1:.4f}'} at epoch {m.get('best_epoch', '-')}, "
                f"{int(m.get('epoch', 0) or 0)} epochs, {took:.0f} s")
        if self.best is not None:
            text += f" | best so far {self.best[0]:.4f} ({self.best[1]})"
        (log.warning if status == "FAILED" else log.info)(text + detail)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._ended(trial, ended_status(trial.last_result, self.shape.epochs_of(trial.config)))

    def on_trial_error(self, iteration, trials, trial, **info):
        self._ended(trial, "FAILED", " (its error: the run's Ray log and the trial's MLflow run)")


class StopOnRequest(Callback):
    """Ends the sweep the way Tune's own Ctrl-C handling does (the experiment state is saved,
    unfinished trials stay resumable with `Tuner.restore`) once `requested()` is true.

    Tune listens on SIGUSR1 for that stop; the signal is raised from inside Tune's loop, where
    Tune's handler is certainly installed (the default action of SIGUSR1 would end the process).
    """

    def __init__(self, requested: Callable[[], bool]):
        self.requested = requested
        self.sent = False
        self.disk_full = False   # a trial failed for want of space: every next one would too

    def on_step_begin(self, iteration, trials, **info):
        if not self.sent and (self.disk_full or self.requested()):
            self.sent = True
            signal.raise_signal(signal.SIGUSR1)

    def on_trial_error(self, iteration, trials, trial, **info):
        with contextlib.suppress(Exception):   # the error file itself may not have been written
            self.disk_full = self.disk_full or no_space(trial.get_error())


# The driver's callbacks of each running sweep, by experiment name. Tune pickles the callbacks
# of a sweep into its experiment state and, on `Tuner.restore`, calls the unpickled copies, which
# cannot hold the terminal or the stop request of the process that resumes. So Tune is given a
# `SweepCallbacks` holding only the name, and it calls whatever this process registered under it.
_LIVE: dict[str, list[Callback]] = {}


class SweepCallbacks(Callback):
    """Forwards Tune's calls to the callbacks this process registered for the sweep (`_LIVE`):
    the same object works for the first start and after a restore."""

    def __init__(self, name: str):
        self.name = name

    def _each(self, hook: str, *args, **kwargs) -> None:
        for callback in _LIVE.get(self.name, ()):
            getattr(callback, hook)(*args, **kwargs)

    def on_step_begin(self, iteration, trials, **info):
        self._each("on_step_begin", iteration, trials, **info)

    def on_trial_start(self, iteration, trials, trial, **info):
        self._each("on_trial_start", iteration, trials, trial, **info)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self._each("on_trial_result", iteration, trials, trial, result, **info)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._each("on_trial_complete", iteration, trials, trial, **info)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._each("on_trial_error", iteration, trials, trial, **info)

    def on_experiment_end(self, trials, **info):
        self._each("on_experiment_end", trials, **info)


@contextlib.contextmanager
def live_callbacks(name: str, callbacks: list[Callback]):
    """While the sweep `name` runs in this process, its `SweepCallbacks` call `callbacks`."""
    _LIVE[name] = callbacks
    try:
        yield
    finally:
        _LIVE.pop(name, None)
