"""Installed as users install it, not as a checkout: a wheel of the project, or `pip install .`
of a clone (not editable), in a fresh virtualenv gives a working `visiontune` in an empty
folder, conf/ included (it ships as data files, found under <prefix>/share/visiontune/conf).
The wheel imports every module of the checkout from the install; after `pip install .` (the
same build, installed: what infra/Dockerfile does) the quick experiment named as the README
tells an installed user to name it (`--config quick`) runs end to end.

The fresh virtualenv gets the project's dependencies (torch, Ray, MLflow: gigabytes) from this
one's site-packages through a path file instead of a new download; the project itself comes
only from the wheel or the folder (this checkout's editable-install hook is not loaded there)."""

from __future__ import annotations

import contextlib
import os
import signal
import site
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_every_conf_file_is_shipped_as_data():
    spec = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    shipped = {str(f) for patterns in spec["data-files"].values() for pattern in patterns
               for f in ROOT.glob(pattern)}
    conf = {str(f) for f in (ROOT / "conf").rglob("*.yaml")}
    assert conf <= shipped, f"conf files a wheel would leave out: {sorted(conf - shipped)}"


def _package(how: str, tmp_path: Path) -> str:
    """What `pip install` is given: a wheel built from the checkout (`pip wheel .`), or the
    project folder itself (`pip install .`, not editable), from a copy of the tracked files as
    a fresh clone has them (no build/ or egg-info of the checkout's own)."""
    if how == "wheel":
        dist = tmp_path / "dist"
        build = subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps",
                                "-w", str(dist), "-q"], capture_output=True, text=True,
                               timeout=600)
        assert build.returncode == 0, build.stderr[-2000:]
        return str(next(dist.glob("visiontune-*.whl")))
    clone = tmp_path / "clone"
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True,
                           check=True).stdout.decode().split("\0")
    for rel in filter(None, files):
        if (ROOT / rel).is_file():
            (clone / rel).parent.mkdir(parents=True, exist_ok=True)
            (clone / rel).write_bytes((ROOT / rel).read_bytes())
    return str(clone)


def _installed(how: str, tmp_path: Path) -> tuple[Path, Path, dict[str, str]]:
    """A fresh virtualenv with the project installed `how`, checked to be the installed copy
    (code and conf/): (its python, an empty folder to run in, the environment to run with)."""
    package = _package(how, tmp_path)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    py = venv / "bin" / "python"
    new_site = subprocess.run([str(py), "-c", "import site; print(site.getsitepackages()[0])"],
                              capture_output=True, text=True, check=True).stdout.strip()
    # The dependencies, as plain paths appended after the new venv's own site-packages.
    (Path(new_site) / "deps.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    install = subprocess.run([str(py), "-m", "pip", "install", "--no-deps", "-q", package],
                             capture_output=True, text=True, timeout=600)
    assert install.returncode == 0, install.stderr[-2000:]
    # From an empty folder, as a user would: `python -c` puts the current folder first on
    # sys.path, so from the checkout it would import the checkout's code.
    empty = tmp_path / "empty"
    empty.mkdir()
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("VISIONTUNE_", "RAY_")) and k != "PYTHONPATH"}
    env.pop("MLFLOW_TRACKING_URI", None)
    where = subprocess.run([str(py), "-c", "import components, pipelines.compose as c; "
                            "print(components.__file__); print(c.conf_dir())"], cwd=empty,
                           env=env, capture_output=True, text=True, check=True).stdout.split()
    assert where[0].startswith(new_site), where        # the wheel's code, not the checkout's
    assert where[1] == str(venv / "share" / "visiontune" / "conf"), where
    bad = subprocess.run([str(venv / "bin" / "visiontune"), "run", "--config", "nosuch"],
                         cwd=empty, env=env, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "config file not found" in bad.stderr + bad.stdout
    assert "Traceback" not in bad.stderr
    return py, empty, env


@pytest.mark.slow
@pytest.mark.integration
def test_a_wheel_installs_every_module_and_the_conf_files(tmp_path):
    """The wheel (`pip wheel .`) ships every module of the checkout: each imports from the
    fresh virtualenv. (It is the build `pip install .` makes and installs: the quick
    experiment runs once, from the folder install below.)"""
    py, empty, env = _installed("wheel", tmp_path)
    modules = sorted(".".join(f.relative_to(ROOT).with_suffix("").parts).removesuffix(
        ".__init__") for pkg in ("components", "pipelines") for f in (ROOT / pkg).rglob("*.py"))
    imported = subprocess.run(
        [str(py), "-c", "import importlib, sys\nfor m in sys.argv[1:]: "
         "print(importlib.import_module(m).__file__)", *modules],
        cwd=empty, env=env, capture_output=True, text=True, timeout=300)
    assert imported.returncode == 0, imported.stderr[-3000:]
    files = imported.stdout.split()
    assert len(files) == len(modules) and all(not f.startswith(str(ROOT)) for f in files), files


@pytest.mark.slow
@pytest.mark.integration
def test_installed_in_a_fresh_venv_runs_the_quick_experiment_from_an_empty_folder(tmp_path):
    """`pip install .` of a clone (what infra/Dockerfile does), then the quick experiment."""
    py, empty, env = _installed("folder", tmp_path)
    venv = py.parent.parent
    # Its own session: whatever it starts (a local Ray) is ended with it, also on a failure.
    proc = subprocess.Popen([str(venv / "bin" / "visiontune"), "run", "--config", "quick",
                             "train.epochs=1", "ray.num_cpus=2"], cwd=empty, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=900)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == 0, (out[-3000:], err[-3000:])
    assert "registered: models:/visiontune-classifier/1" in out
    assert (empty / "mlflow.db").is_file() and (empty / "ray_results").is_dir()
