"""Links into the MLflow UI: what the console prints after a run, promote prints after a
decision, and a hook delivery carries."""

from __future__ import annotations

from urllib.parse import quote

LOCAL_UI = "http://127.0.0.1:5000"  # where `mlflow ui` serves by default


def review_links(uri: str, experiment_id: str, run_id: str, model_name: str = "",
                 version: str = "") -> dict[str, str]:
    """Direct links into the MLflow UI (3.x routes, hash router): the run's page, the
    experiment's runs table and the registered model version. A local store (SQLite, files)
    has no UI of its own: the links are those of `mlflow ui` on its default address."""
    base = uri.rstrip("/") if uri.startswith(("http://", "https://")) else LOCAL_UI
    experiment = f"{base}/#/experiments/{experiment_id}"
    links = {"run": f"{experiment}/runs/{run_id}", "runs": f"{experiment}/runs"}
    if model_name and version:
        links["model"] = f"{base}/#/models/{quote(model_name, safe='')}/versions/{version}"
    return links
