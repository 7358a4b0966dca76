"""The registry gate tells "not found" from a registry that failed: only the first may read as
"no champion"; anything else raises RegistryError and moves no alias (SQLite registry, and a
tracking URI where no server listens)."""

import socket

import pytest
import requests
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from components.registry import (
    CHALLENGER,
    CHAMPION,
    PREVIOUS,
    PromotionError,
    RegistryError,
    get_alias_version,
    get_version,
    is_not_found,
    promote,
    register_challenger,
    rollback,
)
from components.tracking import Tracker

pytestmark = pytest.mark.integration   # opens a SQLite MLflow store

FP = "a" * 64
TAGS = {"data_fingerprint": FP, "test_f1_average": "macro"}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One SQLite registry for the module (creating its tables takes seconds); each test uses
    its own model name."""
    tmp = tmp_path_factory.mktemp("registry")
    tracker = Tracker(f"sqlite:///{tmp}/mlflow.db")
    exp = tracker.ensure_experiment("errors", str(tmp / "art"))
    return tracker, exp, str(tmp / "art" / "model")


def _register(store, name, test_f1):
    # The gate reads only aliases and tags, so a version needs no logged model behind it.
    # One pipeline run registers one version: each registration has its own run.
    tracker, exp, source = store
    run = tracker.create_run(exp, "pipeline", {})
    return register_challenger(tracker, source, name, run, {**TAGS, "test_f1": test_f1})


def _raised(fn, *args) -> BaseException:
    with pytest.raises(Exception) as info:
        fn(*args)
    return info.value


def _aliases(store, name) -> dict[str, str]:
    model = MlflowClient(tracking_uri=store[0].uri).get_registered_model(name)
    return {alias: str(version) for alias, version in model.aliases.items()}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _FailingClient:
    """The real client, except that reading one alias fails as a broken server would."""

    def __init__(self, client: MlflowClient, alias: str):
        self._client, self._alias = client, alias

    def __getattr__(self, attr):
        return getattr(self._client, attr)

    def get_model_version_by_alias(self, name, alias):
        if alias == self._alias:
            raise MlflowException("(sqlite3.OperationalError) database is locked",
                                  error_code="TEMPORARILY_UNAVAILABLE")
        return self._client.get_model_version_by_alias(name, alias)


class _FailingTracker(Tracker):
    def __init__(self, uri: str, alias: str):
        super().__init__(uri)
        self._alias = alias

    @property
    def client(self):
        return _FailingClient(MlflowClient(tracking_uri=self.uri), self._alias)


def test_real_not_found_errors_are_not_found(store):
    _register(store, "nf", 0.5)
    client = store[0].client
    missing = {
        "alias of an existing model": _raised(client.get_model_version_by_alias, "nf", "gone"),
        "alias of a missing model": _raised(client.get_model_version_by_alias, "none", CHAMPION),
        "missing model": _raised(client.get_registered_model, "none"),
        "missing version": _raised(client.get_model_version, "nf", "99"),
    }
    assert {k: is_not_found(e) for k, e in missing.items()} == dict.fromkeys(missing, True)


@pytest.mark.parametrize("exc", [
    MlflowException("(sqlite3.OperationalError) database is locked",
                    error_code="TEMPORARILY_UNAVAILABLE"),
    MlflowException("API request to http://h/api/2.0/mlflow/registered-models/alias failed with "
                    "exception ... Connection refused", error_code="INTERNAL_ERROR"),
    MlflowException("Registered model alias champion not found.", error_code="INTERNAL_ERROR"),
    MlflowException("API request to endpoint /api/2.0/mlflow/registered-models/alias failed "
                    "with error code 404 != 200", error_code="ENDPOINT_NOT_FOUND"),
    MlflowException("Permission denied", error_code="PERMISSION_DENIED"),
    requests.ConnectionError("Connection refused"),
    LookupError("not found"),
], ids=["locked", "refused", "alias-msg-other-code", "not-an-mlflow-server", "denied",
        "requests", "other-type"])
def test_other_errors_are_not_not_found(exc):
    assert not is_not_found(exc)


def test_invalid_alias_name_is_not_not_found(store):
    # Also INVALID_PARAMETER_VALUE, like a missing alias: the code alone is not enough.
    exc = _raised(store[0].client.get_model_version_by_alias, "nf", "bad alias!")
    assert exc.error_code == "INVALID_PARAMETER_VALUE" and not is_not_found(exc)


def test_get_alias_version_is_none_only_when_not_found(store):
    tracker = store[0]
    _register(store, "g", 0.5)
    assert str(get_alias_version(tracker, "g", CHAMPION).version) == "1"
    assert get_alias_version(tracker, "g", PREVIOUS) is None
    assert get_alias_version(tracker, "no-such-model", CHAMPION) is None
    with pytest.raises(LookupError, match="no version 7"):
        get_version(tracker, "g", "7")
    with pytest.raises(RegistryError, match="database is locked; no alias was moved"):
        get_alias_version(_FailingTracker(tracker.uri, CHAMPION), "g", CHAMPION)


def test_unreachable_registry_raises_registry_error(monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "3")
    tracker = Tracker(f"http://127.0.0.1:{_free_port()}")
    with pytest.raises(RegistryError) as info:
        get_alias_version(tracker, "m", CHAMPION)
    message = str(info.value)
    assert message.startswith(f"the model registry at {tracker.uri} failed while reading alias "
                              "champion of model m: ")
    assert message.endswith("; no alias was moved") and "\n" not in message
    # MLflow 3.17 wraps the refused connection; the gate must not rely on which type it is.
    assert isinstance(info.value.__cause__, (MlflowException, requests.RequestException))
    for call in (lambda: promote(tracker, "m"), lambda: rollback(tracker, "m"),
                 lambda: get_version(tracker, "m", "1"),
                 lambda: register_challenger(tracker, "/nowhere", "m", "run", {})):
        with pytest.raises(RegistryError):
            call()


def test_promote_moves_no_alias_when_reading_the_champion_fails(store):
    tracker = store[0]
    _register(store, "p", 0.5)
    _register(store, "p", 0.9)  # same data, same averaging, better: would be promoted
    before = _aliases(store, "p")
    assert before == {CHAMPION: "1", CHALLENGER: "2"}
    with pytest.raises(RegistryError, match="alias champion of model p"):
        promote(_FailingTracker(tracker.uri, CHAMPION), "p")
    assert _aliases(store, "p") == before
    assert "promotion.decision" not in tracker.client.get_model_version("p", "2").tags
    # The same registry, reading normally, gets past the champion to the images (these
    # versions have no pipeline run behind them: tests/integration/test_promotion.py promotes real
    # ones): the error alone held the alias.
    with pytest.raises(PromotionError, match="no split manifest"):
        promote(tracker, "p")
    assert _aliases(store, "p") == before


def test_register_creates_nothing_when_reading_the_champion_fails(store):
    tracker, exp, source = store
    _register(store, "r", 0.5)
    run = tracker.create_run(exp, "pipeline", {})
    with pytest.raises(RegistryError, match="alias champion of model r"):
        register_challenger(_FailingTracker(tracker.uri, CHAMPION), source, "r", run,
                            {**TAGS, "test_f1": 0.9})
    assert _aliases(store, "r") == {CHAMPION: "1", CHALLENGER: "1"}
    assert [str(mv.version) for mv in tracker.client.search_model_versions("name = 'r'")] == ["1"]


def test_rollback_moves_no_alias_when_reading_fails(store):
    tracker = store[0]
    _register(store, "b", 0.5)
    _register(store, "b", 0.9)
    tracker.client.set_registered_model_alias("b", PREVIOUS, "1")  # as a promotion leaves it
    tracker.client.set_registered_model_alias("b", CHAMPION, "2")
    before = _aliases(store, "b")
    with pytest.raises(RegistryError, match="alias previous-champion of model b"):
        rollback(_FailingTracker(tracker.uri, PREVIOUS), "b")
    assert _aliases(store, "b") == before


def test_a_run_registers_one_version_also_when_registering_again(store):
    """A resumed run that was killed half-way through registering gets its version back
    (aliases completed), not a second one."""
    tracker, exp, source = store
    run = tracker.create_run(exp, "pipeline", {})
    first = register_challenger(tracker, source, "once", run, {**TAGS, "test_f1": 0.5})
    tracker.client.delete_registered_model_alias("once", CHALLENGER)  # killed before aliases
    tracker.client.delete_registered_model_alias("once", CHAMPION)
    again = register_challenger(tracker, source, "once", run, {**TAGS, "test_f1": 0.5})
    assert again.version == first.version == "1"
    assert set(again.aliases) == {CHALLENGER, CHAMPION}
    assert _aliases(store, "once") == {CHAMPION: "1", CHALLENGER: "1"}
    assert len(tracker.client.search_model_versions("name = 'once'")) == 1
