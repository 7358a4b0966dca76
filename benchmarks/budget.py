"""How close does a sweep planned to a budget come to it, and how good is the probe?

For each budget (2, 4 and 8 minutes by default) one `visiontune run search.budget=B` of the
default search (CNN and ResNet-18 x optimizers x initializers on the built-in digits) runs
as its own subprocess in a fresh temporary directory. From its MLflow record:

- planned: the plan's estimate of the tune step (`budget_estimate_seconds`, probe included);
- actual: the tune step's wall time (`sweep_seconds`), and the whole command's wall time;
- per model family, the probe's seconds per epoch against the epochs the trials then ran
  (the median gap between consecutive `val_f1` timestamps of the family's trials: the
  epoch's training, validation, logging and checkpoint), and what the trials got (trials,
  epochs run, KILLED) and the test macro-F1 of the run.

    python benchmarks/budget.py                    # 2, 4, 8 min: about 17 minutes on 2 cores
    python benchmarks/budget.py --budgets 90s 3m   # other budgets

Run it on an otherwise idle machine. Results: benchmarks/results/budget.json (not committed).
"""

from __future__ import annotations

import argparse
import json
import statistics

from runs import pipeline_run, save_results


def run_budget(budget: str, extra: list[str]) -> dict:
    with pipeline_run(f"search.budget={budget}", *extra,
                      prefix="visiontune-bench-budget-") as (client, parent, children, out, wall):
        m, plan = parent.data.metrics, json.loads(parent.data.tags["visiontune.budget.plan"])
        families = {}
        for name, trials, epochs, first_rung, epoch_s, start_s in plan["families"]:
            mine = [c for c in children if c.data.params.get("model.name", "cnn") == name]
            gaps, ran = [], []
            for c in mine:
                stamps = [h.timestamp for h in sorted(
                    client.get_metric_history(c.info.run_id, "val_f1"), key=lambda h: h.step)]
                gaps += [(b - a) / 1000 for a, b in zip(stamps, stamps[1:])]
                ran.append(len(stamps))
            actual = statistics.median(gaps) if gaps else None
            families[name] = {
                "planned": {"trials": trials, "epochs": epochs, "first_rung": first_rung},
                "probe_epoch_s": round(epoch_s, 2),
                "actual_epoch_s": None if actual is None else round(actual, 2),
                "probe_over_actual": None if not actual else round(epoch_s / actual, 2),
                "trials_run": len(mine), "epochs_run": ran,
                "killed": sum(c.info.status == "KILLED" for c in mine)}
        return {"budget": budget, "budget_s": m["budget_seconds"],
                "planned_s": round(m["budget_estimate_seconds"], 1),
                "actual_s": round(m["sweep_seconds"], 1), "command_wall_s": round(wall, 1),
                "actual_over_budget": round(m["sweep_seconds"] / m["budget_seconds"], 3),
                "actual_over_planned": round(m["sweep_seconds"] / m["budget_estimate_seconds"],
                                             3),
                "test_f1": round(m["test_f1"], 4),
                "ended_because": parent.data.tags.get("visiontune.sweep.ended_because"),
                "plan_line": next((line.strip() for line in out.splitlines()
                                   if line.strip().startswith("budget ")), ""),
                "families": families}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budgets", nargs="+", default=["2m", "4m", "8m"])
    ap.add_argument("overrides", nargs="*", help="more overrides for every run")
    args = ap.parse_args()
    results = []
    for budget in args.budgets:
        r = run_budget(budget, args.overrides)
        fam = "; ".join(f"{k}: probe {v['probe_epoch_s']} s/epoch vs {v['actual_epoch_s']} "
                        f"ran, {v['trials_run']} trials, epochs {v['epochs_run']}"
                        for k, v in r["families"].items())
        print(f"budget {budget}: planned {r['planned_s']} s, actual {r['actual_s']} s "
              f"({r['actual_over_budget']:.0%} of the budget), command {r['command_wall_s']} "
              f"s, test F1 {r['test_f1']}; {fam}; ended because {r['ended_because']}",
              flush=True)
        results.append(r)
    save_results("budget", results)

if __name__ == "__main__":
    main()
