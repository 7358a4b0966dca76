"""One real `mlflow server` and one tiny `visiontune run` against it, shared by the serving and
the UI tests (a pipeline run is most of their time): the champion they serve and the pages
they open are the same run's."""

from __future__ import annotations

import pytest

from tests.conftest import cli_env, mlflow_server, run_tiny_pipeline

SERVED_MODEL = "e2e-served"
PLANTED = {"MLFLOW_TRACKING_PASSWORD": "vt-planted-password-7f3a9c",
           "AWS_SECRET_ACCESS_KEY": "vt-planted-aws-secret-51e2b8",
           "MLFLOW_TRACKING_TOKEN": "vt-planted-token-c04d11"}
# Not a secret: MLflow records the user name as the runs' owner (tag mlflow.user).
USER = {"MLFLOW_TRACKING_USERNAME": "vt-user"}


@pytest.fixture(scope="session")
def served_pipeline(tmp_path_factory):
    """`mlflow server` (SQLite, artifacts proxied, in a temp dir) on a free loopback port, in
    its own process group (its web workers go down with it), and one `visiontune run` against
    it that registered SERVED_MODEL@champion. Yields tmp, env, url (the tracking URI), data,
    log (the run's console output) and model."""
    tmp = tmp_path_factory.mktemp("served")
    # Secrets as an operator passes them, through the environment: none may reach the record
    # (tests/e2e/test_security.py greps it).
    env = cli_env(**PLANTED, **USER)
    with mlflow_server(tmp, env) as url:
        ran = run_tiny_pipeline(tmp, url, SERVED_MODEL, env)
        yield {"tmp": tmp, "env": env, "url": url, "uri": url, "data": ran["data"],
               "log": ran["log"], "model": SERVED_MODEL}
