"""Where a sweep's time goes: compute, and everything around it.

One run measures, side by side on this machine:

1. the bare loop: the trial's model, data, augmentation, batch size and validation in a plain
   PyTorch loop with as many threads as a trial has CPUs (no Ray, no MLflow, no checkpoints),
   for the CNN and for ResNet-18;
2. the floor: Tune trials whose `TorchTrainer` runs a trivial loop (import torch, one report)
   with the same resources (2 workers x 1 CPU, actors reused): Ray Train's own cost per trial;
3. the pipeline's sweep (the default search unless --search says otherwise), run as
   `visiontune run` runs it, with every process marking its steps (components/timing.py):
   start-up per trial split into its parts, epoch time against the bare loop, checkpoint and
   MLflow shares, sweep wall against the bare compute of the same trials;
4. the same space with ASHA stopping weak trials: best val F1 and trial-epochs used.

    python benchmarks/trial_overhead.py              # about 15 minutes on 2 cores
    python benchmarks/trial_overhead.py --quick      # a 4-trial look, about 4 minutes

Results: benchmarks/results/trial_overhead.json, val_f1_curves.png and val_f1_curves_asha.png
(`--quick`: the same names with `_quick`; not committed).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

RESULTS = Path(__file__).resolve().parent / "results"
SUFFIX = ""  # "_quick" for a --quick run: its results do not replace a full run's


def median(values) -> float:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else float("nan")


# ----------------------------------------------------------------------------- bare loop

def bare_epochs(cfg, manifest, epochs: int, threads: int) -> list[float]:
    """Seconds per epoch (train + validation) of the trial's work in a plain loop."""
    import torch
    from torch import nn
    from torch.utils.data import DataLoader

    from components.augment import eval_preprocessing
    from components.data.dataset import EpochShuffle
    from components.models import build_model
    from components.models.freezing import build_param_groups
    from components.training.loaders import rank_datasets
    from components.training.loop import train_one_epoch
    from components.training.optim import build_optimizer, build_scheduler
    from components.training.ranks import evaluate_split
    from components.training.spec import TrainJob

    torch.set_num_threads(threads)
    torch.manual_seed(cfg.seed)
    job = TrainJob(data=cfg.data, augment=cfg.augment, model=cfg.model, train=cfg.train,
                   average=cfg.evaluation.average, seed=cfg.seed,
                   train_rows=manifest.subset("train"), val_rows=manifest.subset("val"),
                   num_classes=len(manifest.classes))
    prep = eval_preprocessing(job.data, job.model)
    train_ds, val_ds = rank_datasets(job, 0, 1, prep)
    tc = job.train
    sampler = EpochShuffle(len(train_ds), seed=job.seed)
    train_loader = DataLoader(train_ds, batch_size=tc.batch_size, sampler=sampler,
                              drop_last=len(train_ds) > tc.batch_size)
    val_loader = DataLoader(val_ds, batch_size=max(tc.batch_size, 256))
    model = build_model(job.model, job.num_classes, job.data.channels)
    optimizer = build_optimizer(tc.optimizer, build_param_groups(model, tc.lr), tc.lr,
                                tc.weight_decay, tc.momentum, tuple(tc.betas), tc.eps)
    scheduler, when = build_scheduler(tc.scheduler, optimizer, tc.epochs, len(train_loader),
                                      tc.step_size, tc.gamma)
    loss_fn = nn.CrossEntropyLoss()
    times = []
    for epoch in range(1, epochs + 1):
        started = time.monotonic()
        sampler.set_epoch(epoch)
        train_one_epoch(model, train_loader, optimizer, loss_fn, torch.device("cpu"),
                        batch_scheduler=scheduler if when == "batch" else None)
        evaluate_split(model, val_loader, torch.device("cpu"), job.num_classes, job.average)
        if when == "epoch":
            scheduler.step()
        times.append(time.monotonic() - started)
    return times


# ----------------------------------------------------------------------------- the floor

def trivial_loop(config: dict) -> None:
    import ray.train
    import torch  # noqa: F401  (a real training function imports it)

    from components.timing import mark

    ctx = ray.train.get_context()
    mark("floor_fn", trial=ctx.get_experiment_name(), rank=ctx.get_world_rank())
    ray.train.report({"epoch": 1})
    mark("floor_fn_end", trial=ctx.get_experiment_name(), rank=ctx.get_world_rank())


def floor_trial(config: dict, storage_path: str, workers: int, cpus: float) -> None:
    from ray import tune
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    from components.timing import mark

    trial_id = tune.get_context().get_trial_id()
    mark("trial_start", trial=trial_id)
    mark("fit_start", trial=trial_id)
    TorchTrainer(trivial_loop, torch_config=TorchConfig(backend="gloo"),
                 scaling_config=ScalingConfig(num_workers=workers,
                                              resources_per_worker={"CPU": cpus}),
                 run_config=RunConfig(name=trial_id, storage_path=storage_path,
                                      callbacks=[TuneReportCallback()])).fit()
    mark("fit_end", trial=trial_id)
    mark("trial_end", trial=trial_id)


def run_floor(trials: int, workers: int, cpus: float, tmp: Path) -> None:
    from ray import tune

    from components.cluster import ray_session
    from components.tuning.plan import TRIAL_RESOURCES
    from pipelines.console import console

    # Ray's and Tune's output of the floor goes to a log, as the pipeline's does.
    with console.ray_output_to(tmp / "floor-ray.log"), ray_session(None):
        trainable = tune.with_resources(
            tune.with_parameters(floor_trial, storage_path=str(tmp / "floor"), workers=workers,
                                 cpus=cpus), dict(TRIAL_RESOURCES))
        tune.Tuner(trainable, param_space={"i": tune.grid_search(list(range(trials)))},
                   tune_config=tune.TuneConfig(
                       reuse_actors=True,
                       search_alg=tune.search.BasicVariantGenerator(max_concurrent=1)),
                   run_config=tune.RunConfig(name="floor", storage_path=str(tmp / "tune"),
                                             verbose=0)).fit()


# ----------------------------------------------------------------------------- analysis

def by_trial(marks: list[dict], prefix: str = "") -> dict[str, dict]:
    """Per Train run (trial id): its marks, keyed by event (and rank for worker events)."""
    trials: dict[str, dict] = {}
    for m in marks:
        if "trial" not in m:
            continue
        t = trials.setdefault(m["trial"], {"epochs": []})
        if m["event"] == "epoch":
            if m["rank"] == 0:
                t["epochs"].append(m)
        elif "rank" in m:
            t.setdefault(m["event"], {})[m["rank"]] = m
        else:
            t[m["event"]] = m
    return {k: v for k, v in trials.items() if "trial_start" in v}


def trial_row(t: dict) -> dict:
    """Start-up parts, epochs and wall of one trial, in seconds."""
    start = t["trial_start"]["t"]
    row = {"wall_s": t["trial_end"]["t"] - start if "trial_end" in t else None}
    fn = "worker_start" if "worker_start" in t else "floor_fn"
    if fn not in t:
        return row
    ranks = t[fn]
    r0 = ranks[0]
    row["launch_s"] = min(r.get("import_started", r["t"]) for r in ranks.values()) - \
        t["fit_start"]["t"]
    if fn == "floor_fn":
        row["startup_s"] = max(r["t"] for r in ranks.values()) - start
        if "fit_end" in t and "floor_fn_end" in t:
            row["teardown_s"] = t["fit_end"]["t"] - max(r["t"] for r in
                                                        t["floor_fn_end"].values())
        row["epochs_s"] = 0.0
        return row
    row["mlflow_run_s"] = t["trial_run_ready"]["t"] - start
    row["before_fit_s"] = t["fit_start"]["t"] - t["trial_run_ready"]["t"]
    row["imports_s"] = max(r["imported"] - r["import_started"] for r in ranks.values())
    row["to_function_s"] = max(r["t"] - r["imported"] for r in ranks.values())
    row["data_s"] = t["worker_data"][0]["t"] - r0["t"]
    row["model_s"] = t["worker_ddp"][0]["t"] - t["worker_data"][0]["t"]
    row["ddp_s"] = t["worker_model"][0]["t"] - t["worker_ddp"][0]["t"]
    after_model = t["worker_model"][0]["t"]
    if "worker_mlflow" in t:
        row["rank0_mlflow_s"] = t["worker_mlflow"][0]["t"] - after_model
        after_model = t["worker_mlflow"][0]["t"]
    if "worker_first_batch" not in t:
        return row
    first = max(r["t"] for r in t["worker_first_batch"].values())
    row["first_batch_s"] = first - after_model
    row["startup_s"] = first - start
    epochs = t["epochs"]
    row["epochs"] = len(epochs)
    row["epoch_s"] = [e["train_s"] + e["val_s"] + e["log_s"] + e["save_s"] + e["report_s"]
                      for e in epochs]
    row["compute_s"] = [e["train_s"] + e["val_s"] for e in epochs]
    row["epochs_s"] = sum(row["epoch_s"])
    row["log_s"] = sum(e["log_s"] for e in epochs)
    row["checkpoint_s"] = sum(e["save_s"] + e["report_s"] for e in epochs)
    row["model"] = r0.get("model")
    # A trial the scheduler stopped was killed: no end marks, no teardown of its own.
    if "worker_end" in t and "fit_end" in t:
        row["teardown_s"] = t["fit_end"]["t"] - max(r["t"] for r in t["worker_end"].values())
    if row["wall_s"] is not None:
        row["overhead_s"] = row["wall_s"] - row["epochs_s"]
    return row


def summarize_trials(rows: list[dict]) -> dict:
    """Medians over the trials after the first (the first also pays for Ray's start)."""
    later = rows[1:] or rows
    keys = sorted({k for r in later for k, v in r.items() if isinstance(v, (int, float))})
    return {k: median(r.get(k) for r in later) for k in keys}


# ----------------------------------------------------------------------------- pipeline

def run_pipeline(overrides: list[str], tmp: Path, name: str):
    from pipelines.compose import load_config
    from pipelines.console import log_to_console
    from pipelines.training import run_training_pipeline

    log_to_console()   # the run's lines on the console, as `visiontune run` prints them
    cfg = load_config([f"tracking.uri=sqlite:///{tmp}/{name}.db",
                       f"tracking.artifact_location={tmp}/{name}-mlruns",
                       f"ray.storage_path={tmp}/{name}-ray", *overrides])
    started = time.monotonic()
    result = run_training_pipeline(cfg)
    return cfg, result, time.monotonic() - started


def val_f1_curves(cfg, result) -> list[dict]:
    from mlflow import MlflowClient

    client = MlflowClient(cfg.tracking.uri)
    exp = client.get_run(result.parent_run_id).info.experiment_id
    runs = client.search_runs([exp], f"tags.mlflow.parentRunId = '{result.parent_run_id}'",
                              max_results=500)
    curves = []
    for run in runs:
        history = sorted(client.get_metric_history(run.info.run_id, "val_f1"),
                         key=lambda m: m.step)
        curves.append({"params": {k: v for k, v in run.data.params.items()
                                  if k in ("model.name", "train.optimizer", "model.initializer",
                                           "train.lr", "model.dropout")},
                       "status": run.info.status, "val_f1": [m.value for m in history]})
    return curves


def plot_curves(curves: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({c["params"].get("model.name", "?") for c in curves})
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4.2), squeeze=False,
                             sharey=True)
    for ax, model in zip(axes[0], models):
        for c in curves:
            if c["params"].get("model.name", "?") != model or not c["val_f1"]:
                continue
            p = c["params"]
            label = (f"{p.get('train.optimizer', '')} {p.get('model.initializer', '')} "
                     f"lr={float(p.get('train.lr', 'nan')):.4f}")
            ax.plot(range(1, len(c["val_f1"]) + 1), c["val_f1"], marker="o", label=label)
        ax.set_title(model)
        ax.set_xlabel("epoch")
        ax.set_ylim(0.0, 1.01)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("val macro-F1")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def sweep_report(marks: list[dict], rows: list[dict], bare: dict[str, float],
                 concurrency: int) -> dict:
    starts = [m["t"] for m in marks if m["event"] == "sweep_start"]
    ends = [m["t"] for m in marks if m["event"] == "sweep_end"]
    wall = ends[-1] - starts[0]
    compute = sum(r.get("epochs", 0) * bare.get(r.get("model"), float("nan"))
                  for r in rows) / concurrency
    epochs_total = sum(r.get("epochs_s", 0) for r in rows)
    return {"wall_s": wall, "bare_compute_s": compute, "ratio": wall / compute,
            "trials": len(rows), "trial_epochs": sum(r.get("epochs", 0) for r in rows),
            "checkpoint_share": sum(r.get("checkpoint_s", 0) for r in rows) / epochs_total,
            "mlflow_log_share": sum(r.get("log_s", 0) for r in rows) / epochs_total}


# ----------------------------------------------------------------------------- main

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="4 CNN trials, 2 epochs")
    ap.add_argument("--search", action="append", default=[],
                    help="extra overrides for the swept pipeline (repeatable)")
    ap.add_argument("--floor-trials", type=int, default=4)
    ap.add_argument("--no-asha", action="store_true", help="skip the ASHA comparison")
    args = ap.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    global SUFFIX
    SUFFIX = "_quick" if args.quick else ""
    overrides = (["search=quick", "train.epochs=2"] if args.quick else []) + args.search
    from components import timing
    from pipelines.compose import load_config

    cfg0 = load_config(overrides)
    workers, cpus = cfg0.train.num_workers, cfg0.train.cpus_per_worker
    concurrency = max(1, int((os.cpu_count() or 1) // (workers * cpus)))
    out: dict = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                             "platform": platform.platform()},
                 "command": " ".join(["python", "benchmarks/trial_overhead.py", *sys.argv[1:]]),
                 "overrides": overrides}
    with tempfile.TemporaryDirectory(prefix="vt-overhead-") as d:
        tmp = Path(d)
        marks_file = tmp / "marks.jsonl"
        os.environ[timing.ENV] = str(marks_file)  # before Ray starts: workers inherit it

        # The data the pipeline will use (written once, as the pipeline writes it).
        from components.data import (
            index_images,
            split_dataset,
            validate_images,
            write_digits_folder,
        )
        from components.data.split import min_images_per_class

        root = cfg0.data.path or str(write_digits_folder(cfg0.data.cache_dir))
        images = validate_images(index_images(root), "skip", min_images_per_class(
            cfg0.data.val_fraction, cfg0.data.test_fraction))
        manifest = split_dataset(images, cfg0.data.val_fraction, cfg0.data.test_fraction,
                                 cfg0.seed)

        print("1/4 bare loop", flush=True)
        bare = {}
        for model, epochs in (("cnn", 4), ("resnet18", 3)):
            times = bare_epochs(load_config(overrides + [f"model.name={model}"]), manifest,
                                epochs, int(workers * cpus))
            bare[model] = median(times[1:])
            print(f"  {model}: {', '.join(f'{t:.2f}' for t in times)} s per epoch", flush=True)
        out["bare_epoch_s"] = bare

        print(f"2/4 floor: {args.floor_trials} trivial TorchTrainer trials", flush=True)
        marks_file.write_text("")
        run_floor(args.floor_trials, workers, cpus, tmp)
        floor_rows = [trial_row(t) for t in
                      sorted(by_trial(timing.read_marks(str(marks_file))).values(),
                             key=lambda t: t["trial_start"]["t"])]
        out["floor"] = {"trials": floor_rows, "median_after_first": summarize_trials(floor_rows)}
        save(out)
        print(f"  {json.dumps(out['floor']['median_after_first'])}", flush=True)

        print("3/4 the pipeline's sweep " + " ".join(overrides), flush=True)
        marks_file.write_text("")
        cfg, result, wall = run_pipeline(overrides, tmp, "grid")
        marks = timing.read_marks(str(marks_file))
        rows = [trial_row(t) for t in sorted(by_trial(marks).values(),
                                             key=lambda t: t["trial_start"]["t"])]
        epoch_ratio = {}
        for model in bare:
            later = [e for r in rows if r.get("model") == model for e in r["epoch_s"][1:]]
            compute = [e for r in rows if r.get("model") == model for e in r["compute_s"][1:]]
            if later:
                epoch_ratio[model] = {"trial_epoch_s": median(later),
                                      "trial_compute_s": median(compute),
                                      "ratio": median(later) / bare[model]}
        curves = val_f1_curves(cfg, result)
        plot_curves(curves, RESULTS / f"val_f1_curves{SUFFIX}.png",
                    f"val F1 per epoch, {' '.join(overrides) or 'default search'}")
        out["pipeline"] = {
            "wall_s": wall, "test_f1": result.test_metrics.get("test_f1"),
            "best_val_f1": result.best_val_f1, "trials": rows,
            "median_after_first": summarize_trials(rows), "epoch_vs_bare": epoch_ratio,
            "sweep": sweep_report(marks, rows, bare, concurrency), "curves": curves,
            "marks": marks}
        save(out)

        if not args.no_asha:
            print("4/4 the same space with ASHA", flush=True)
            marks_file.write_text("")
            asha_over = overrides + ["search.scheduler=asha"]
            cfg_a, result_a, wall_a = run_pipeline(asha_over, tmp, "asha")
            marks_a = timing.read_marks(str(marks_file))
            rows_a = [trial_row(t) for t in sorted(by_trial(marks_a).values(),
                                                   key=lambda t: t["trial_start"]["t"])]
            curves_a = val_f1_curves(cfg_a, result_a)
            plot_curves(curves_a, RESULTS / f"val_f1_curves_asha{SUFFIX}.png",
                        f"val F1 per epoch with ASHA, {' '.join(asha_over)}")
            out["asha"] = {"wall_s": wall_a, "test_f1": result_a.test_metrics.get("test_f1"),
                           "best_val_f1": result_a.best_val_f1,
                           "sweep": sweep_report(marks_a, rows_a, bare, concurrency),
                           "median_after_first": summarize_trials(rows_a), "curves": curves_a}
    save(out)
    print_summary(out)
    return 0


def save(out: dict) -> None:
    """Results so far (a later phase that fails keeps the earlier ones)."""
    (RESULTS / f"trial_overhead{SUFFIX}.json").write_text(json.dumps(out, indent=1, default=str))


def print_summary(out: dict) -> None:
    f, p = out["floor"]["median_after_first"], out["pipeline"]
    m, s = p["median_after_first"], p["sweep"]
    print("\n== per trial (median over the trials after the first), seconds")
    print(f"  start-up (trial start -> first training step): project {m['startup_s']:.1f}, "
          f"floor {f['startup_s']:.1f} (difference {m['startup_s'] - f['startup_s']:+.1f})")
    print(f"  wall overhead (trial wall - its epochs): project {m['overhead_s']:.1f}, "
          f"floor {f['wall_s']:.1f} (difference {m['overhead_s'] - f['wall_s']:+.1f})")
    parts = ("mlflow_run_s", "before_fit_s", "launch_s", "imports_s", "to_function_s",
             "data_s", "model_s", "ddp_s", "rank0_mlflow_s", "first_batch_s", "teardown_s")
    print("  project start-up parts: " + ", ".join(f"{k[:-2]} {m.get(k, float('nan')):.2f}"
                                                    for k in parts))
    print(f"  floor: launch {f['launch_s']:.2f}, teardown {f['teardown_s']:.2f}")
    for model, e in p["epoch_vs_bare"].items():
        print(f"  epoch {model}: trial {e['trial_epoch_s']:.2f} (compute "
              f"{e['trial_compute_s']:.2f}) vs bare {out['bare_epoch_s'][model]:.2f} = "
              f"{e['ratio']:.3f}x")
    print(f"== sweep: {s['trials']} trials, {s['trial_epochs']} trial-epochs, wall "
          f"{s['wall_s']:.0f} s vs bare compute {s['bare_compute_s']:.0f} s = {s['ratio']:.2f}x; "
          f"checkpoints {100 * s['checkpoint_share']:.1f}% and MLflow logging "
          f"{100 * s['mlflow_log_share']:.1f}% of epoch time")
    print(f"== pipeline: {p['wall_s']:.0f} s wall, best val F1 {p['best_val_f1']:.4f}, "
          f"test F1 {p['test_f1']:.4f}")
    if "asha" in out:
        a = out["asha"]
        print(f"== ASHA: {a['sweep']['trial_epochs']} trial-epochs (grid "
              f"{s['trial_epochs']}), best val F1 {a['best_val_f1']:.4f} (grid "
              f"{p['best_val_f1']:.4f}), test F1 {a['test_f1']:.4f}, wall {a['wall_s']:.0f} s")


if __name__ == "__main__":
    sys.exit(main())
