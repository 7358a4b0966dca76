"""How fast is the default sweep next to what a user would write instead?

One run trains the SAME trials four ways on this machine and times each from the outside:

(a) hand: a hand-written loop over the trials in one Python process, one after another, torch
    threads = the machine's cores: the pipeline's data split, augmentation, model, optimizer
    and scheduler builders, epochs, batch size, validation each epoch, patience, and MLflow
    logging as the pipeline logs (a parent run, a child run per trial with its params, each
    epoch's metrics) into a local SQLite store;
(b) optuna: an in-process Optuna study (`create_study(direction="maximize")`, the trials
    enqueued with `enqueue_trial`, `optimize(n_trials=..., n_jobs=1)`) whose objective is the
    loop of (a);
(c) auto: `visiontune run search.budget=null`: the default config without its budget, so
    every trial trains its 6 epochs as (a) does (the planner's choice, `train.num_workers=auto`);
(d) ddp2: `visiontune run train.num_workers=2` (the old default: a 2-worker DDP TorchTrainer
    per trial).

The default search is 8 trials (optimizer x initializer x model on a grid, learning rate and
dropout drawn at random) of 6 epochs on the built-in digits. (c) runs first; (a) and (b) then
train exactly the parameters its trials drew (read from its MLflow child runs), and (d) draws
the same ones again (same seed; the results say whether they matched).

Every sweep runs as its own subprocess, in a fresh temporary directory as its working
directory, timed around the subprocess: each pays for its own interpreter start and its
imports (torch, MLflow; before `rank_datasets` moved to `components/training/loaders.py`,
(a)/(b) also paid for Ray, which its module imported: about 0.3 s). (c) and (d) also pay for
what the pipeline does besides the sweep (ingest, validate, split, evaluating the best trial
on the test set, registering its model): their `tune` step alone is in the table too.
(a) and (b) compute no test F1.

Same trials, not bit-equal scores: with 1 torch thread the loop of (a) reproduces (c)'s
trials' val F1 exactly; with the cores as threads the float sums differ and so do the last
digits. (d) trains each trial on 2 ranks of train.batch_size each (twice the global batch,
half the steps per epoch), so its scores differ more. The per-trial lines show them side by
side (best val F1 and epochs run).

    python benchmarks/sweep.py               # the four sweeps, about 15-20 minutes on 2 cores
    python benchmarks/sweep.py --per-model   # + per model (cnn, resnet18) a 2-trial sweep of
                                             #   3 epochs, auto vs train.num_workers=2 (+5 min)
    python benchmarks/sweep.py --quick       # smoke check: 2 trials of 1 epoch, about 2 min
                                             #   (with --per-model: 1 epoch, about 6 min)

Run it on an otherwise idle machine: the timings are the point. Results:
benchmarks/results/sweep.json, sweep.png (wall time per sweep) and sweep_logs/ (each sweep's
output); `--quick`: the same names with `_quick` (not committed).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import json
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"
CLI = ROOT / ".venv" / "bin" / "visiontune"
SUFFIX = ""  # "_quick" for a --quick run: its results do not replace a full run's
QUICK = ["search=quick", "train.epochs=1"]
NAMES = {"hand": "(a) hand-written loop, 1 process",
         "optuna": "(b) Optuna study, in-process",
         "auto": "(c) visiontune run (auto plan)",
         "ddp2": "(d) visiontune run num_workers=2"}
ORDER = ("hand", "optuna", "auto", "ddp2")
METRICS = ("train_loss", "val_loss", "val_accuracy", "val_precision", "val_recall", "val_f1",
           "lr", "best_val_f1")


# ----------------------------------------------------------------------------- (a), (b)

def load_data(overrides: list[str]):
    """The config and the split the pipeline uses (same data, same seed)."""
    from components.data import index_images, split_dataset, validate_images, write_digits_folder
    from components.data.split import min_images_per_class
    from pipelines.compose import load_config

    cfg = load_config(overrides)
    d = cfg.data
    root = d.path or str(write_digits_folder(d.cache_dir))
    images = validate_images(index_images(root), d.on_bad_image,
                             min_images_per_class(d.val_fraction, d.test_fraction))
    split_seed = cfg.seed if d.split_seed is None else d.split_seed
    return cfg, split_dataset(images, d.val_fraction, d.test_fraction, split_seed)


def train_trial(cfg, manifest, params: dict, threads: int, log_epoch) -> dict:
    """One trial as a user writes it: the pipeline's builders in a plain loop, patience on
    val F1, `log_epoch(epoch, metrics)` after every epoch. Returns its best epoch's record."""
    import torch
    from torch import nn
    from torch.utils.data import DataLoader

    from components.augment import eval_preprocessing
    from components.data.dataset import EpochShuffle
    from components.models import build_model
    from components.models.freezing import build_param_groups, unfreeze
    from components.training.loaders import rank_datasets
    from components.training.loop import track_best, train_one_epoch
    from components.training.optim import build_optimizer, build_scheduler
    from components.training.ranks import evaluate_split, state_dict
    from components.training.spec import TrainJob
    from components.tuning.space import TUNABLE_SECTIONS, set_params

    cfg = dataclasses.replace(cfg, **set_params({s: getattr(cfg, s) for s in TUNABLE_SECTIONS},
                                                params))
    torch.set_num_threads(threads)
    torch.manual_seed(cfg.seed)  # as a trial seeds itself, before its data and model
    job = TrainJob(data=cfg.data, augment=cfg.augment, model=cfg.model, train=cfg.train,
                   average=cfg.evaluation.average, seed=cfg.seed,
                   train_rows=manifest.subset("train"), val_rows=manifest.subset("val"),
                   num_classes=len(manifest.classes))
    tc, mc, cpu = job.train, job.model, torch.device("cpu")
    train_ds, val_ds = rank_datasets(job, 0, 1, eval_preprocessing(job.data, job.model))
    sampler = EpochShuffle(len(train_ds), seed=job.seed)
    train_loader = DataLoader(train_ds, batch_size=tc.batch_size, sampler=sampler,
                              drop_last=len(train_ds) > tc.batch_size,
                              num_workers=job.data.loader_workers)
    val_loader = DataLoader(val_ds, batch_size=max(tc.batch_size, 256),
                            num_workers=job.data.loader_workers)
    model = build_model(mc, job.num_classes, job.data.channels)
    groups = build_param_groups(model, tc.lr, freeze=mc.freeze, stage=mc.freeze_stage,
                                unfreeze_epoch=mc.unfreeze_epoch,
                                backbone_lr_mult=mc.backbone_lr_mult)
    optimizer = build_optimizer(tc.optimizer, groups, tc.lr, tc.weight_decay, tc.momentum,
                                tuple(tc.betas), tc.eps)
    scheduler, when = build_scheduler(tc.scheduler, optimizer, tc.epochs, len(train_loader),
                                      tc.step_size, tc.gamma)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=tc.label_smoothing)
    state = {"epoch": 0, "best_val_f1": -1.0, "best_val_loss": float("inf"), "best_epoch": 0,
             "epochs_without_gain": 0, "stopped_early": False}
    best_weights = None
    for epoch in range(1, tc.epochs + 1):
        sampler.set_epoch(epoch)
        if mc.unfreeze_epoch is not None and epoch >= mc.unfreeze_epoch:
            unfreeze(optimizer, scheduler)
        total, count = train_one_epoch(
            model, train_loader, optimizer, loss_fn, cpu,
            batch_scheduler=scheduler if when == "batch" else None, grad_clip=tc.grad_clip,
            l1=tc.l1)
        val = evaluate_split(model, val_loader, cpu, job.num_classes, job.average)
        if when == "epoch":
            scheduler.step()
        elif when == "plateau":
            scheduler.step(val["f1"])
        improved, stop = track_best(state, epoch, val["f1"], val["loss"], tc.patience)
        if improved:
            best_weights = state_dict(model)  # what a user keeps to evaluate or save later
        log_epoch(epoch, {"train_loss": total / max(count, 1), "val_loss": val["loss"],
                          "val_accuracy": val["accuracy"], "val_precision": val["precision"],
                          "val_recall": val["recall"], "val_f1": val["f1"],
                          "lr": optimizer.param_groups[0]["lr"],
                          "best_val_f1": state["best_val_f1"]})
        if stop:
            break
    del best_weights
    return {"best_val_f1": state["best_val_f1"], "best_epoch": state["best_epoch"],
            "epochs": state["epoch"]}


class MlflowLog:
    """The pipeline's run tree, written as a user would with `MlflowClient`: a parent run, a
    child run per trial (tag mlflow.parentRunId) with its params, one batch per epoch."""

    def __init__(self, workdir: Path, name: str):
        from mlflow import MlflowClient

        self.client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
        self.experiment = self.client.create_experiment(
            name, artifact_location=(workdir / "mlruns").as_uri())
        self.parent = self.client.create_run(self.experiment, run_name=name).info.run_id

    def trial(self, name: str, params: dict):
        from mlflow.entities import Metric, Param

        run_id = self.client.create_run(self.experiment, run_name=name,
                                        tags={"mlflow.parentRunId": self.parent}).info.run_id
        self.client.log_batch(run_id, params=[Param(k, str(v)) for k, v in params.items()])

        def log_epoch(epoch: int, metrics: dict) -> None:
            ts = int(time.time() * 1000)
            self.client.log_batch(run_id, metrics=[Metric(k, float(v), ts, epoch)
                                                   for k, v in metrics.items()])
        return run_id, log_epoch

    def end(self, run_id: str, metrics: dict | None = None) -> None:
        from mlflow.entities import Metric

        if metrics:
            ts = int(time.time() * 1000)
            self.client.log_batch(run_id, metrics=[Metric(k, float(v), ts, 0)
                                                   for k, v in metrics.items()])
        self.client.set_terminated(run_id, "FINISHED")


def in_process_sweep(kind: str, trials: list[dict], overrides: list[str], workdir: Path) -> dict:
    """(a) or (b) in this process: everything a user's script does, from loading the data."""
    started = time.monotonic()
    threads = os.cpu_count() or 1
    cfg, manifest = load_data(overrides)
    log = MlflowLog(workdir, f"sweep-{kind}")
    rows: list[dict] = []

    def one(params: dict) -> float:
        t0 = time.monotonic()
        run_id, log_epoch = log.trial(f"trial_{len(rows)}", params)
        row = train_trial(cfg, manifest, params, threads, log_epoch)
        log.end(run_id)
        rows.append({"params": params, **row, "seconds": time.monotonic() - t0})
        print(f"  {kind} trial {len(rows)}/{len(trials)}: best val_f1 {row['best_val_f1']:.4f} "
              f"at epoch {row['best_epoch']}, {row['epochs']} epochs, "
              f"{rows[-1]['seconds']:.1f} s", flush=True)
        return row["best_val_f1"]

    if kind == "hand":
        for params in trials:
            one(params)
        best = max(r["best_val_f1"] for r in rows)
    else:
        import optuna

        from components.tuning.space import parse_space

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        axes = {a.key: a for a in parse_space(cfg.search.space)}

        def objective(trial) -> float:
            params = {}
            for key in trials[trial.number]:  # the keys this trial uses, in the pipeline's order
                a = axes[key]
                if a.is_categorical:
                    params[key] = trial.suggest_categorical(key, list(a.args))
                elif a.kind == "randint":
                    params[key] = trial.suggest_int(key, a.args[0], a.args[1])
                else:
                    params[key] = trial.suggest_float(
                        key, a.args[0], a.args[1], log=a.kind == "loguniform",
                        step=a.args[2] if a.kind == "quniform" else None)
            return one(params)

        study = optuna.create_study(direction="maximize")
        for params in trials:
            study.enqueue_trial(params)
        study.optimize(objective, n_trials=len(trials), n_jobs=1)
        best = study.best_value
    log.end(log.parent, {"best_val_f1": best})
    return {"best_val_f1": best, "trials": rows, "threads": threads,
            "in_process_s": time.monotonic() - started}


# ----------------------------------------------------------------------------- subprocesses

def run_logged(cmd: list[str], cwd: Path, log_path: Path, show=lambda line: True,
               env: dict | None = None):
    """Run `cmd` in `cwd`, its output to `log_path` and (the lines `show` keeps) here;
    returns (wall seconds around the subprocess, exit code, output lines). Interrupted, the
    subprocess's whole process group is ended (a visiontune run then shuts its Ray down)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    lines: list[str] = []
    started = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        with open(log_path, "w") as log:
            for line in proc.stdout:
                log.write(line)
                lines.append(line.rstrip("\n"))
                if show(lines[-1]):
                    print("    | " + lines[-1], flush=True)
        rc = proc.wait()
    except BaseException:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        raise
    return time.monotonic() - started, rc, lines


def _number(pattern: str, lines: list[str]) -> float | None:
    for line in lines:
        m = re.search(pattern, line)
        if m:
            return float(m.group(1))
    return None


def _cli_trials(workdir: Path, overrides: list[str]) -> list[dict]:
    """The trials of a visiontune run from its MLflow child runs, in launch order, with
    their params typed as the search space types them."""
    from mlflow import MlflowClient

    from components.tuning.space import parse_space
    from pipelines.compose import load_config

    axes = {a.key: a for a in parse_space(load_config(overrides).search.space)}
    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    exp = client.get_experiment_by_name(load_config(overrides).tracking.experiment_name)
    runs = client.search_runs([exp.experiment_id], "tags.`visiontune.role` = 'trial'",
                              max_results=1000)
    trials = []
    for run in sorted(runs, key=lambda r: r.data.tags.get("visiontune.trial_id", "")):
        params = {}
        for key, a in axes.items():  # the space's order
            if key not in run.data.params:
                continue
            raw = run.data.params[key]
            if a.is_categorical:
                params[key] = next((v for v in a.args if str(v) == raw), raw)
            else:
                params[key] = int(raw) if a.kind == "randint" else float(raw)
        history = client.get_metric_history(run.info.run_id, "val_f1")
        trials.append({"params": params, "status": run.info.status,
                       "best_val_f1": run.data.metrics.get("best_val_f1"),
                       "best_epoch": run.data.metrics.get("best_epoch"),
                       "epochs": len(history)})
    return trials


def cli_sweep(overrides: list[str], workdir: Path, name: str) -> dict:
    """`visiontune run OVERRIDES` in a fresh directory, timed around the subprocess."""
    workdir.mkdir(parents=True)
    cmd = [str(CLI), "run", *overrides]
    print(f"  $ visiontune run {' '.join(overrides)}", flush=True)
    wall, rc, lines = run_logged(cmd, workdir, RESULTS / f"sweep{SUFFIX}_logs" / f"{name}.log",
                                 show=lambda line: not line.startswith("    ") or "why:" in line)
    out = {"command": "visiontune run " + " ".join(overrides), "wall_s": wall, "rc": rc,
           "plan": [ln for ln in lines if ln.startswith(("  plan:", "    why:"))],
           "best_val_f1": _number(r"^\s+val F1:\s+([0-9.]+|nan)", lines),
           "test_f1": _number(r"^\s+test F1:\s+([0-9.]+|nan)", lines),
           # the pipeline's own clock, from inside the process (no interpreter start)
           "reported_s": _number(r"^visiontune run \S+ finished in ([0-9.]+)s", lines),
           "steps_s": {m.group(1): float(m.group(2)) for ln in lines
                       if (m := re.match(r"\[visiontune\] (\w+) done in ([0-9.]+)s", ln))}}
    counts = next((ln.split(":", 1)[1] for ln in lines if ln.startswith("  trials: {")), None)
    if counts:
        out["trial_counts"] = ast.literal_eval(counts.strip().split(" (")[0])
    if rc != 0:
        out["error"] = "\n".join(lines[-30:])
        print(f"  !! exit code {rc}; the last lines:\n" + out["error"], flush=True)
    try:
        out["trials"] = _cli_trials(workdir, overrides)
    except Exception as e:  # a run that failed early may have no store
        out["trials"] = []
        out.setdefault("error", f"reading its MLflow runs: {type(e).__name__}: {e}")
    return out


def child_sweep(kind: str, trials: list[dict], overrides: list[str], workdir: Path) -> dict:
    """(a) or (b) as a fresh `python benchmarks/sweep.py --only KIND`, timed from here."""
    workdir.mkdir(parents=True)
    (workdir / "trials.json").write_text(json.dumps(trials))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--only", kind,
           "--workdir", str(workdir), "--overrides", json.dumps(overrides)]
    # MLflow's INFO lines quieted as visiontune quiets them
    quiet = {"MLFLOW_LOGGING_LEVEL": os.environ.get("MLFLOW_LOGGING_LEVEL", "WARNING")}
    wall, rc, lines = run_logged(cmd, workdir, RESULTS / f"sweep{SUFFIX}_logs" / f"{kind}.log",
                                 env=quiet)
    out = {"command": " ".join(["python", "benchmarks/sweep.py", "--only", kind]),
           "wall_s": wall, "rc": rc}
    result = workdir / "result.json"
    if rc == 0 and result.is_file():
        out.update(json.loads(result.read_text()))
    else:
        out["error"] = "\n".join(lines[-30:])
        print(f"  !! exit code {rc}; the last lines:\n" + out["error"], flush=True)
    return out


# ----------------------------------------------------------------------------- report

def save(out: dict) -> None:
    """Results so far (a later sweep that fails keeps the earlier ones)."""
    (RESULTS / f"sweep{SUFFIX}.json").write_text(json.dumps(out, indent=1, default=str))


def _f(value, fmt: str = ".4f") -> str:
    """`value` in `fmt`, or "-" right-aligned to the width `fmt` gives (e.g. "8.1f")."""
    width = int(re.match(r"\d*", fmt).group(0) or 0)
    return "-".rjust(width) if value is None else format(value, fmt)


def print_table(out: dict) -> None:
    sweeps = out["sweeps"]
    base = (sweeps.get("hand") or {}).get("wall_s")
    print(f"\n== {out['num_trials']} trials, the same in every sweep "
          f"({' '.join(out['overrides']) or 'default config'})")
    print(f"  {'sweep':<36} {'wall s':>8} {'x (a)':>6} {'tune s':>7} {'best val F1':>11} "
          f"{'test F1':>8} {'epochs':>6}")
    for key in ORDER:
        s = sweeps.get(key)
        if s is None:
            continue
        wall = s.get("wall_s")
        ratio = wall / base if base and wall else None
        epochs = sum(t.get("epochs", 0) for t in s.get("trials", []))
        failed = "" if s.get("rc") == 0 else f"  (exit {s.get('rc')})"
        print(f"  {NAMES[key]:<36} {_f(wall, '8.1f')} {_f(ratio, '6.2f')} "
              f"{_f(s.get('steps_s', {}).get('tune'), '7.1f')} {_f(s.get('best_val_f1'), '11.4f')} "
              f"{_f(s.get('test_f1'), '8.4f')} {epochs:>6}{failed}")
    print("  per trial: best val F1 (epochs run) in (a) (b) (c) (d)")
    for i, params in enumerate(out.get("trial_params", [])):
        cells = []
        for key in ORDER:
            rows = sweeps.get(key, {}).get("trials", [])
            t = rows[i] if i < len(rows) else {}
            cells.append(f"{_f(t.get('best_val_f1'), '.4f')} ({t.get('epochs', '-')})")
        short = " ".join(f"{k.split('.')[-1]}={v:.3g}" if isinstance(v, float) else
                         f"{k.split('.')[-1]}={v}" for k, v in params.items())
        print(f"    {i + 1}. {short:<62} {'  '.join(cells)}")
    for key in ("auto", "ddp2"):
        for line in sweeps.get(key, {}).get("plan", []):
            print(f"  {key}: {line.strip()}")
    if "per_model" in out:
        print(f"\n== per model: {out['per_model_overrides']}")
        print(f"  {'model':<10} {'auto s':>8} {'2 workers s':>11} {'2w / auto':>9} "
              f"{'val F1 auto':>11} {'val F1 2w':>9}")
        for model, p in out["per_model"].items():
            a, d = p.get("auto", {}), p.get("ddp2", {})
            ratio = d["wall_s"] / a["wall_s"] if a.get("wall_s") and d.get("wall_s") else None
            print(f"  {model:<10} {_f(a.get('wall_s'), '8.1f')} {_f(d.get('wall_s'), '11.1f')} "
                  f"{_f(ratio, '9.2f')} {_f(a.get('best_val_f1'), '11.4f')} "
                  f"{_f(d.get('best_val_f1'), '9.4f')}")
            for line in a.get("plan", [])[:1]:
                print(f"    auto: {line.strip()}")


def plot(out: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bars = [(NAMES[k], out["sweeps"][k]["wall_s"]) for k in ORDER if k in out["sweeps"]]
    per_model = [(f"{m} {NAMES[k].split(' ', 1)[1].replace('visiontune run ', '')}",
                  p[k]["wall_s"]) for m, p in out.get("per_model", {}).items()
                 for k in ("auto", "ddp2") if k in p]
    panels = [("the same %d trials" % out["num_trials"], bars)]
    if per_model:
        panels.append(("per model, " + out["per_model_overrides"], per_model))
    fig, axes = plt.subplots(len(panels), 1, figsize=(9, 1.2 + 0.55 * sum(len(b) for _, b in
                                                                       panels) + len(panels)),
                             squeeze=False)
    base = out["sweeps"].get("hand", {}).get("wall_s")
    for ax, (title, rows) in zip(axes[:, 0], panels):
        labels, walls = [r[0] for r in rows][::-1], [r[1] for r in rows][::-1]
        ax.barh(labels, walls, color="#4c72b0")
        for i, w in enumerate(walls):
            note = f" {w:.0f} s" + (f"  ({w / base:.2f}x (a))" if base and rows is bars else "")
            ax.text(w, i, note, va="center", fontsize=8)
        ax.set_xlim(0, max(walls) * 1.3)
        ax.set_xlabel("wall seconds (lower is faster)")
        ax.set_title(title, fontsize=10)
    fig.suptitle(f"sweep wall time on {out['machine']['cpus']} CPUs"
                 + (" (--quick)" if SUFFIX else ""))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------- main

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="2 trials of 1 epoch: a smoke check")
    ap.add_argument("--per-model", action="store_true",
                    help="also: per model a 2-trial sweep, auto vs train.num_workers=2")
    ap.add_argument("--only", choices=("hand", "optuna"), help=argparse.SUPPRESS)
    ap.add_argument("--workdir", help=argparse.SUPPRESS)
    ap.add_argument("--overrides", default="[]", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.only:  # one in-process sweep, run by the benchmark as its own subprocess
        workdir = Path(args.workdir)
        trials = json.loads((workdir / "trials.json").read_text())
        result = in_process_sweep(args.only, trials, json.loads(args.overrides), workdir)
        (workdir / "result.json").write_text(json.dumps(result, default=str))
        return 0

    global SUFFIX
    SUFFIX = "_quick" if args.quick else ""
    (RESULTS / f"sweep{SUFFIX}_logs").mkdir(parents=True, exist_ok=True)
    # Without the default's budget: every trial trains every epoch, as the loop of (a) does
    # (the same trials; the budget's own accuracy: benchmarks/budget.py).
    overrides = [*(QUICK if args.quick else []), "search.budget=null"]
    load = os.getloadavg()
    out: dict = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                             "platform": platform.platform(), "load_avg_at_start": load},
                 "command": " ".join(["python", "benchmarks/sweep.py", *sys.argv[1:]]),
                 "started": time.strftime("%Y-%m-%d %H:%M:%S"), "overrides": overrides,
                 "sweeps": {}}
    if load[0] > 0.5:
        print(f"warning: load average {load[0]:.2f} at start: other work on this machine "
              "skews the timings", flush=True)
    # The built-in data written once before anything is timed (every sweep reads it).
    from components.data import write_digits_folder
    from pipelines.compose import load_config

    write_digits_folder(load_config(overrides).data.cache_dir)
    sweeps = out["sweeps"]
    with tempfile.TemporaryDirectory(prefix="vt-sweep-") as d:
        tmp = Path(d)
        print(f"1/4 {NAMES['auto']}", flush=True)
        sweeps["auto"] = cli_sweep(overrides, tmp / "auto", "auto")
        save(out)
        trials = [t["params"] for t in sweeps["auto"]["trials"]]
        if sweeps["auto"]["rc"] != 0 or not trials:
            print("(c) failed: without its trials the others cannot run the same ones")
            return 1
        out["num_trials"] = len(trials)
        out["trial_params"] = trials
        for i, kind in ((2, "hand"), (3, "optuna")):
            print(f"{i}/4 {NAMES[kind]}", flush=True)
            sweeps[kind] = child_sweep(kind, trials, overrides, tmp / kind)
            save(out)
        print(f"4/4 {NAMES['ddp2']}", flush=True)
        sweeps["ddp2"] = cli_sweep(overrides + ["train.num_workers=2"], tmp / "ddp2", "ddp2")
        out["ddp2_same_trials"] = [t["params"] for t in sweeps["ddp2"]["trials"]] == trials
        if not out["ddp2_same_trials"]:
            print("  note: (d) drew other parameters than (c)", flush=True)
        save(out)

        if args.per_model:
            epochs = 1 if args.quick else 3
            out["per_model_overrides"] = f"search=quick model=<m> train.epochs={epochs}"
            out["per_model"] = {}
            for model in ("cnn", "resnet18"):
                base = ["search=quick", f"model={model}", f"train.epochs={epochs}"]
                p = out["per_model"][model] = {}
                for kind, extra in (("auto", []), ("ddp2", ["train.num_workers=2"])):
                    print(f"per model: {model}, {kind}", flush=True)
                    p[kind] = cli_sweep(base + extra, tmp / f"{model}-{kind}", f"{model}-{kind}")
                    save(out)
    out["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    save(out)
    plot(out, RESULTS / f"sweep{SUFFIX}.png")
    print_table(out)
    print(f"\nresults: {RESULTS / f'sweep{SUFFIX}.json'}, {RESULTS / f'sweep{SUFFIX}.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
