"""What a careless operator or an attacker would try, short of a server (tests/e2e/test_security.py
has the served model): credentials in URIs, a network call at import, secrets next to the code,
a registered model whose code was changed in the artifact store."""

import json
import os
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlparse

import pytest

from components.config import ConfigError
from pipelines.cli import main
from pipelines.compose import load_config

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("override,secret", [
    ("data.path=s3://AKIAPLANTED:SKPLANTED@bucket/x", "SKPLANTED"),
    ("tracking.uri=http://u:PWPLANTED@127.0.0.1:5000", "PWPLANTED"),
    ("data.test_path=gs://tok:PLANTED@bucket/test", "PLANTED"),
    ("ray.storage_path=s3://bucket/ray?secret_key=PLANTED", "PLANTED"),
    ("tracking.artifact_location=s3://bucket/a?X-Amz-Signature=PLANTED", "PLANTED"),
    # A '/', '#' or '?' inside the secret (half of all AWS secret keys hold a '/') ends the
    # authority for urlsplit, which then sees no password at all.
    ("data.path=s3://AKIAPLANTED:wJalr/K7MDPLANTED@bucket/x", "K7MDPLANTED"),
    ("tracking.uri=http://u:p/ssPLANTED@127.0.0.1:5000", "ssPLANTED"),
    ("tracking.uri=http://u:p#ssPLANTED@127.0.0.1:5000", "ssPLANTED"),
    ("ray.storage_path=s3://AKIAPLANTED:ab?cdPLANTED@bucket/ray", "cdPLANTED"),
])
def test_credentials_in_a_uri_are_refused_without_printing_them(override, secret, capsys):
    with pytest.raises(ConfigError, match="carries credentials") as info:
        load_config([override])
    assert secret not in str(info.value) and "environment" in str(info.value)
    assert main(["run", override, "--print-config"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and secret not in err
    assert err.startswith("visiontune: config error: ")


@pytest.mark.parametrize("uri", [
    "s3://bucket/users/me@example.org/photos", "s3://bucket/a:b@c/d",
    "http://127.0.0.1:5000/mlflow@team", "gs://bucket/x?prefix=a@b", "file:///data/a@b:c",
    "s3://bucket/x", "http://127.0.0.1:5000"])
def test_an_at_sign_in_a_path_is_not_taken_for_credentials(uri):
    from components.credentials import masked, uri_secret

    assert uri_secret(uri) is None
    assert masked(uri).split("?")[0] == uri.split("?")[0]


def test_a_tracking_uri_with_credentials_from_the_environment_is_refused(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "https://me:PLANTED@mlflow.example.org")
    with pytest.raises(ConfigError, match=r"MLFLOW_TRACKING_URI .*https://\*\*\*@mlflow") as e:
        load_config([])
    assert "PLANTED" not in str(e.value)


def test_submit_refuses_an_address_with_credentials(capsys):
    code = main(["submit", "--address", "http://u:PLANTED@127.0.0.1:1"])
    err = capsys.readouterr().err
    assert code == 2 and "PLANTED" not in err and "carries credentials" in err


def test_predict_refuses_a_tracking_uri_with_credentials(capsys):
    code = main(["predict", "--model", "models:/m@champion", "x.png",
                 "--tracking-uri", "http://u:PLANTED@127.0.0.1:1"])
    err = capsys.readouterr().err
    assert code == 2 and "PLANTED" not in err and "carries credentials" in err


_PROBE = """
import json, sys, time
events = []
sys.addaudithook(lambda e, a: events.append(e) if e.startswith(("socket.", "urllib.")) else None)
import {module}
time.sleep(3)   # a check on a background thread would show by now
print(json.dumps(sorted(set(events))))
"""


def _sockets_at_import(module: str, inherited: str | None = None) -> list[str]:
    env = {k: v for k, v in os.environ.items() if k != "NO_ALBUMENTATIONS_UPDATE"}
    if inherited is not None:
        env["NO_ALBUMENTATIONS_UPDATE"] = inherited
    out = subprocess.run([sys.executable, "-c", _PROBE.format(module=module)], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_importing_the_augmentation_opens_no_socket():
    """albumentations asks PyPI for updates on import unless NO_ALBUMENTATIONS_UPDATE is set:
    the project sets it itself (the environment here has it unset)."""
    assert _sockets_at_import("albumentations"), "the control should reach for the network"
    assert _sockets_at_import("components.augment") == []
    # a value a shell left empty (or "0") would turn albumentations' check back on
    assert _sockets_at_import("components.augment", inherited="") == []
    # a Train worker's whole import (torch, Ray, MLflow too: Ray binds a local socket) reaches
    # for no other host
    outbound = {"socket.connect", "socket.getaddrinfo", "socket.gethostbyname", "urllib.Request"}
    assert not outbound & set(_sockets_at_import("components.training.worker"))


def test_secret_files_are_neither_committed_nor_uploaded():
    from pipelines.jobs import EXCLUDES

    ignored = (ROOT / ".gitignore").read_text().splitlines()
    assert {".env", ".env.*"} <= set(ignored)
    assert {".env", ".env.*"} <= set(EXCLUDES)
    # Ray applies the excludes as gitignore patterns (its own vendored pathspec): .env files
    # in any folder match
    from ray._private.thirdparty.pathspec import PathSpec

    spec = PathSpec.from_lines("gitwildmatch", EXCLUDES)
    for path in ("infra/mlflow/.env", ".env", ".env.production", "conf/prod.env"):
        assert spec.match_file(path), path
    assert not spec.match_file("components/config.py")


def test_a_version_whose_code_changed_in_the_artifact_store_is_refused(tmp_path, capsys):
    import torch

    from components.registry import Evidence, PromotionError, promote
    from components.serving import CODE_TAG
    from components.tracking import Tracker
    from tests.conftest import make_image_folder, register_like_the_pipeline

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    data = make_image_folder(tmp_path / "pets", per_class=20, corrupt=False)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 2)).eval()
    for _ in range(2):
        register_like_the_pipeline(uri, str(tmp_path / "art"), data, net, "signed")
    tracker = Tracker(uri)
    mv = tracker.client.get_model_version("signed", "2")
    assert "preprocessing.py=" in mv.tags[CODE_TAG] and "MLmodel=" in mv.tags[CODE_TAG]
    image = str(next((data / "cat").glob("*.png")))
    before = main(["predict", "--model", "models:/signed/2", image, "--tracking-uri", uri])
    assert before == 0
    capsys.readouterr()

    model = tracker.client.get_logged_model(mv.source.removeprefix("models:/"))
    (code,) = Path(urlparse(model.artifact_location).path).rglob("preprocessing.py")
    code.write_text(code.read_text() + "\nimport os  # an attacker's line\n")

    with pytest.raises(PromotionError, match=r"preprocessing.py no longer matches its sha256"):
        # 6 test images here: the size check is not what this test is about
        promote(tracker, "signed", version="2", evidence=Evidence(min_images=1))
    assert str(tracker.client.get_model_version_by_alias("signed", "champion").version) == "1"
    assert main(["predict", "--model", "models:/signed@challenger", image,
                 "--tracking-uri", uri]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "preprocessing.py no longer matches its sha256" in err[0]
    assert "signed version 2" in err[0]
