"""Early stopping on a space that mixes model families: does it stop the right trials?

One run, three sweeps of the SAME 16 trials (the default space with two random draws per
grid point: CNN and ResNet-18 x SGD with momentum and Adam x Xavier and Kaiming, learning rate
and dropout drawn with the same seed), no budget, each `visiontune run` in its own
subprocess and temporary directory:

- full: every trial trains its 6 epochs (`search.scheduler=none`);
- ASHA before: Tune's ASHA, every trial compared with every other at the same epoch
  (`search.scheduler=asha_global`);
- ASHA after: successive halving within each model family (`search.scheduler=asha`).

For each: the test macro-F1 of the best trial (what the pipeline registers), the tune step's
wall time, the trials stopped early and which family they were, and the family that won.
Goal (issue 26): "after" within 0.005 test F1 of the full search in at most half its time.

    python benchmarks/early_stopping.py            # about 20 minutes on 2 cores

Run it on an otherwise idle machine. Results: benchmarks/results/early_stopping.json.
"""

from __future__ import annotations

import argparse

from runs import pipeline_run, save_results

SWEEPS = {"full": "none", "asha_before": "asha_global", "asha_after": "asha"}


def run_sweep(scheduler: str, extra: list[str]) -> dict:
    with pipeline_run("search.budget=null", "search.num_samples=2",
                      f"search.scheduler={scheduler}", "search.grace_period=1",
                      "search.reduction_factor=2", *extra,
                      prefix="visiontune-bench-es-") as (client, parent, children, _, wall):
        killed = [c for c in children if c.info.status == "KILLED"]
        best = parent.data.params.get("best_trial_id")
        winner = next((c for c in children if c.data.tags.get("visiontune.trial_id") == best),
                      None)
        return {"scheduler": scheduler, "trials": len(children),
                "test_f1": round(parent.data.metrics["test_f1"], 4),
                "tune_s": round(parent.data.metrics["step_seconds_tune"], 1),
                "command_wall_s": round(wall, 1), "stopped": len(killed),
                "stopped_by_family": {f: sum(c.data.params.get("model.name") == f
                                             for c in killed) for f in ("cnn", "resnet18")},
                "winner": None if winner is None else {
                    k: winner.data.params.get(k) for k in
                    ("model.name", "train.optimizer", "model.initializer", "train.lr")},
                "epochs_run": sum(len(client.get_metric_history(c.info.run_id, "val_f1"))
                                  for c in children)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("overrides", nargs="*", help="more overrides for every sweep")
    args = ap.parse_args()
    results = {}
    for name, scheduler in SWEEPS.items():
        r = results[name] = run_sweep(scheduler, args.overrides)
        print(f"{name:12s} test F1 {r['test_f1']:.4f}, tune {r['tune_s']:6.1f} s, "
              f"{r['epochs_run']} trial-epochs, stopped {r['stopped']} "
              f"{r['stopped_by_family']}, winner {r['winner']}", flush=True)
    full = results["full"]
    for name in ("asha_before", "asha_after"):
        r = results[name]
        r["f1_gap_to_full"] = round(full["test_f1"] - r["test_f1"], 4)
        r["time_over_full"] = round(r["tune_s"] / full["tune_s"], 3)
        print(f"{name}: {r['f1_gap_to_full']:+.4f} test F1 below the full search, "
              f"{r['time_over_full']:.2f}x its time", flush=True)
    save_results("early_stopping", results)

if __name__ == "__main__":
    main()
