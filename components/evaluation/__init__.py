"""Evaluation: choose the best trial by validation F1, evaluate it once on the test split, and
the paired comparison of two models on the same images (`paired`).

Names are imported on first use (as in `components.data`): the CLI imports `paired`'s
constants without paying for torch and matplotlib."""

from importlib import import_module

_WHERE = {
    "plot_comparison_heatmap": "comparison", "plot_continuous_axes": "comparison",
    "per_class_metrics": "errors", "plot_misclassified": "errors",
    "plot_per_class_metrics": "errors",
    "TestReport": "evaluate", "evaluate_on_test": "evaluate", "leaderboard": "evaluate",
    "plot_confusion_matrix": "evaluate", "plot_trial_curves": "evaluate",
    "select_best_trial": "evaluate",
    "PairedDecision": "paired", "decide": "paired", "plot_bootstrap": "paired",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(f"{__name__}.{_WHERE[name]}"), name)
    globals()[name] = value
    return value


def __dir__():
    return __all__
