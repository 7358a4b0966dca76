"""The parallel-coordinates page: built from the leaderboard, self-contained, and safe with
any value a trial's parameters hold; drawn by headless Chromium when it is installed."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import pandas as pd
import pytest

from components.evaluation.parallel import parallel_coordinates_html, parallel_data
from components.tuning.space import parse_space

AXES = parse_space({"train.optimizer": {"grid": ["sgd_momentum", "adam"]},
                    "train.lr": {"loguniform": [1e-4, 1e-2]},
                    "train.momentum": {"grid": [0.9], "when": {"train.optimizer":
                                                                ["sgd_momentum"]}},
                    "train.batch_size": {"grid": [32]}})


def _board() -> pd.DataFrame:
    return pd.DataFrame({"trial_id": ["a", "b", "c", "d"],
                         "best_val_f1": [0.5, 0.9, 0.7, None],   # d failed: no line
                         "train.optimizer": ["sgd_momentum", "adam", "100% </script>", "adam"],
                         "train.lr": [1e-3, 5e-3, 2e-4, 1e-3],
                         "train.momentum": [0.9, None, None, None],
                         "train.batch_size": [32, 32, 32, 32]})


def test_the_data_has_the_varied_axes_then_best_val_f1_and_one_line_per_scored_trial():
    data = parallel_data(_board(), AXES)
    assert [a["key"] for a in data["axes"]] == ["train.optimizer", "train.lr",
                                                "train.momentum", "best_val_f1"]
    kinds = {a["key"]: a["type"] for a in data["axes"]}
    assert kinds == {"train.optimizer": "cat", "train.lr": "log", "train.momentum": "cat",
                     "best_val_f1": "lin"}
    assert [t["id"] for t in data["trials"]] == ["a", "b", "c"]
    assert data["trials"][1]["values"]["train.momentum"] == "n/a"


def test_the_page_is_self_contained_and_a_hostile_value_cannot_end_its_script():
    page = parallel_coordinates_html(_board(), AXES)
    assert not re.search(r"<(script|link|img)[^>]+(src|href)=", page)
    script = page.split("<script>", 1)[1]
    assert script.count("</script>") == 1            # the value's "</script>" is escaped
    payload = re.search(r"const DATA = (.*);\n", page).group(1)
    assert "<" not in payload
    assert json.loads(payload)["trials"][2]["values"]["train.optimizer"] == "100% </script>"
    assert parallel_coordinates_html(_board().assign(best_val_f1=None), AXES) is None


def test_chromium_draws_one_line_per_trial_and_names_every_axis(tmp_path):
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("no chromium to run the page's script")
    path = tmp_path / "page.html"
    path.write_text(parallel_coordinates_html(_board(), AXES))
    dom = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu",
                          "--dump-dom", path.as_uri()], capture_output=True, text=True,
                         timeout=120).stdout
    assert dom.count('class="trial"') == 3, dom[-2000:]
    names = re.findall(r'<text[^>]*class="name"[^>]*>([^<]+)</text>', dom)
    assert names == ["train.optimizer", "train.lr", "train.momentum", "best_val_f1"]
