import shlex

import numpy as np
import pytest
from PIL import Image

from components.augment import build_eval_transform
from components.imaging import preprocess, softmax
from components.inference.local import expand_paths
from pipelines.jobs import EXCLUDES, build_entrypoint, project_root


def test_preprocess_matches_the_training_eval_transform(tmp_path):
    prep = {"channels": 3, "image_size": 12, "mean": [0.5, 0.4, 0.3], "std": [0.2, 0.2, 0.2]}
    rgba = Image.fromarray(np.random.default_rng(0).integers(0, 255, (30, 17, 4), np.uint8),
                           "RGBA")
    grey = Image.new("L", (5, 9), 200)
    batch = preprocess([rgba, grey], prep)
    assert batch.shape == (2, 3, 12, 12) and batch.dtype == np.float32
    from components.data.dataset import load_image

    rgba.save(tmp_path / "x.png")
    expected = build_eval_transform(3, prep["mean"], prep["std"])(
        image=load_image(str(tmp_path / "x.png"), 3, 12))["image"].numpy()
    np.testing.assert_allclose(preprocess([str(tmp_path / "x.png")], prep)[0], expected,
                               atol=1e-5)
    assert np.allclose(softmax(np.array([[1.0, 1.0], [0.0, 100.0]])), [[0.5, 0.5], [0, 1]])


def test_expand_paths(tmp_path):
    (tmp_path / "a").mkdir()
    for name in ("1.png", "2.JPG", ".hidden.png", "notes.txt"):
        (tmp_path / "a" / name).write_bytes(b"x")
    assert [p.split("/")[-1] for p in expand_paths([str(tmp_path / "a")])] == ["1.png", "2.JPG"]
    with pytest.raises(FileNotFoundError):
        expand_paths([str(tmp_path / "nope")])


def test_job_entrypoint_and_excludes():
    cmd = build_entrypoint(["train.epochs=2", "data.path=/mnt/my data"],
                           str(project_root() / "conf/experiment/quick.yaml"))
    assert shlex.split(cmd) == ["visiontune", "run", "train.epochs=2", "data.path=/mnt/my data",
                                "--config", "conf/experiment/quick.yaml"]
    with pytest.raises(ValueError, match="inside the project"):
        build_entrypoint([], "/etc/passwd")
    for generated in ("mlruns/", "ray_results/", "*.db", "/.venv/", "/data/", "*.pt"):
        assert generated in EXCLUDES


def test_excludes_keep_the_code_and_drop_generated_state(tmp_path):
    """Ray's own matcher (gitignore rules) over a copy of the project's layout."""
    from ray._private.runtime_env.packaging import _get_excludes

    root = project_root()
    match = _get_excludes(root, EXCLUDES)
    for kept in ("components/data/split.py", "components/models/cnn.py", "conf/config.yaml",
                 "pipelines/cli.py", "pyproject.toml"):
        assert not match(root / kept), kept
    for dropped in ("mlruns/1/x", "ray_results/a", "mlflow.db", ".venv/bin/python",
                    "data/cats/1.jpg", "components/__pycache__/x.pyc", ".git/HEAD"):
        assert match(root / dropped), dropped


def test_submit_waits_for_a_new_heads_job_agent(monkeypatch, capsys):
    """A head that has just started answers 500 'No available agent to submit job, please try
    again later' (seen in the e2e test on a loaded machine): submit retries that one answer,
    says so once, and gives up after AGENT_WAIT_S; any other error fails at once."""
    from pipelines import jobs

    class Client:
        def __init__(self, failures: int, message: str):
            self.failures, self.message, self.calls = failures, message, 0

        def submit_job(self, **request):
            self.calls += 1
            if self.calls <= self.failures:
                raise RuntimeError(self.message)
            return request["submission_id"]

    busy = "Request failed with status code 500: No available agent to submit job, please " \
           "try again later.."
    monkeypatch.setattr(jobs.time, "sleep", lambda s: None)
    client = Client(3, busy)
    monkeypatch.setattr(jobs, "job_client", lambda address, token: client)
    job_id, _ = jobs.submit("http://127.0.0.1:9", ["train.epochs=1"])
    assert client.calls == 4 and job_id.startswith("visiontune-")
    assert capsys.readouterr().err.count("job agent is not up yet") == 1

    other = Client(1, "Request failed with status code 400: bad runtime_env")
    monkeypatch.setattr(jobs, "job_client", lambda address, token: other)
    with pytest.raises(RuntimeError, match="bad runtime_env"):
        jobs.submit("http://127.0.0.1:9", [])
    assert other.calls == 1

    never = Client(10**6, busy)
    monkeypatch.setattr(jobs, "job_client", lambda address, token: never)
    monkeypatch.setattr(jobs, "AGENT_WAIT_S", 0)
    with pytest.raises(ConnectionError, match="job agent did not come up in 0 s .*No "
                                              "available agent.*dashboard_agent.log"):
        jobs.submit("http://127.0.0.1:9", [])
