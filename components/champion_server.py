"""`visiontune serve`: MLflow's scoring protocol for the version under an alias, following the
alias as it moves, without dropping or holding a request.

`Follower` owns the served version. It checks the registry every `poll_s` seconds (or at once
when `POST /visiontune/refresh` nudges it: a registry webhook can point there; the nudge
carries nothing the server trusts, it only makes it look). A new version is downloaded and
loaded beside the old one, its files checked against the sha256 recorded at registration,
warmed with one request, and only then swapped in: one reference assignment, so each request
is answered wholly by the version it started with. A version that fails any of that is
refused in one log line and the old one keeps serving.

The app speaks `mlflow models serve`'s protocol (`/ping`, `/health`, `/version`,
`/invocations`, the same parsing and answers: MLflow's own `scoring_server.invocations`), so
its clients keep working; every answer names the version that produced it
(`X-Visiontune-Model-Version`).
"""

import asyncio
import contextlib
import logging
import os
import tempfile
import threading
import time
from dataclasses import dataclass, field

from components.errors import NotFoundError, first_line

VERSION_HEADER = "X-Visiontune-Model-Version"
MODEL_HEADER = "X-Visiontune-Model"
SETTINGS_ENV = "VISIONTUNE_SERVE"   # the settings, for uvicorn's worker processes
MAX_BODY_ENV = "VISIONTUNE_MAX_REQUEST_BYTES"
DEFAULT_MAX_BODY = 512 * 1024 * 1024   # 1,024 images of ~370 KB, base64 in JSON
TIMEOUT_ENV = "MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT"   # MLflow's own setting, same default
MIN_NUDGE_GAP_S = 1.0   # refresh nudges closer than this are one check

log = logging.getLogger("visiontune.serve")


@dataclass(frozen=True)
class ServeSettings:
    tracking_uri: str
    name: str
    alias: str = "champion"
    poll_s: float = 10.0
    require_record: bool = False

    def to_env(self) -> str:
        import json

        return json.dumps(self.__dict__)

    @classmethod
    def from_env(cls) -> "ServeSettings":
        import json

        return cls(**json.loads(os.environ[SETTINGS_ENV]))


@dataclass
class Loaded:
    """One version, ready to answer; its folder lives as long as a request uses it."""
    version: str
    model: object
    schema: object
    folder: tempfile.TemporaryDirectory = field(repr=False)
    seconds: float = 0.0


class Refused(RuntimeError):
    """A version that will not be served. `permanent`: its files, format or answers are
    wrong (not tried again); otherwise fetching it failed (the registry or the artifact store
    did not answer: tried again at the next poll)."""

    def __init__(self, message: str, permanent: bool):
        super().__init__(message)
        self.permanent = permanent


def load_version(settings: ServeSettings, version: str) -> Loaded:
    """Download, verify, load and warm `version`; Refused (one line) when it cannot serve."""
    import mlflow
    import pandas as pd
    from mlflow import MlflowClient
    from mlflow.models import Model

    from components.inference.formats import check_model_format
    from components.serving import CODE_TAG, example_image_bytes, verify_code

    start = time.monotonic()
    what = f"{settings.name} version {version}"
    folder = tempfile.TemporaryDirectory(prefix="visiontune-serve-")
    try:
        tags = MlflowClient(settings.tracking_uri).get_model_version(settings.name,
                                                                     version).tags
        local = mlflow.artifacts.download_artifacts(
            artifact_uri=f"models:/{settings.name}/{version}", dst_path=folder.name,
            tracking_uri=settings.tracking_uri)
    except Exception as e:
        folder.cleanup()
        raise Refused(f"{what}: {first_line(e, None)}", permanent=False) from e
    try:
        verify_code(local, tags.get(CODE_TAG), what)
        info = Model.load(local)
        if check_model_format(info.metadata or {}, info.flavors) != "images":
            raise ValueError("it takes tensors (registered by an older visiontune): serve it "
                             "with `mlflow models serve`, or run the pipeline again")
        model = mlflow.pyfunc.load_model(local)
        prep = info.metadata["preprocessing"]
        warm = model.predict(pd.DataFrame(
            {"image": [example_image_bytes(int(prep["channels"]), int(prep["image_size"]))]}))
        if warm["error"].notna().any():
            raise ValueError(f"it cannot classify its own input example: {warm['error'][0]}")
    except Exception as e:
        folder.cleanup()
        line = first_line(e, None)   # a CodeMismatch names the version itself
        raise Refused(line if line.startswith(what) else f"{what}: {line}",
                      permanent=True) from e
    return Loaded(str(version), model, model.metadata.get_input_schema(), folder,
                  time.monotonic() - start)


class Follower:
    """The version now served, and the thread that moves it with the alias."""

    def __init__(self, settings: ServeSettings):
        self.settings = settings
        self.current: Loaded | None = None
        self.refused: dict[str, str] = {}     # version -> why (not tried again)
        self._nudge = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._said = ""                       # the last state line, said once

    def resolve(self) -> str:
        """The version under the alias now; checks the champion's record (raises
        UnrecordedChampion when the config requires one and it is missing)."""
        from components.registry import CHAMPION, check_champion, get_alias_version
        from components.tracking import Tracker

        s = self.settings
        tracker = Tracker(s.tracking_uri)
        mv = get_alias_version(tracker, s.name, s.alias)
        if mv is None:
            raise NotFoundError(f"model {s.name!r} has no alias {s.alias!r} at {s.tracking_uri}")
        if s.alias == CHAMPION:
            check_champion(tracker, s.name, str(mv.version), s.require_record, self._say)
        return str(mv.version)

    def start(self) -> Loaded:
        """Load the version under the alias now (errors raise: nothing to serve yet), then
        follow the alias in a thread."""
        self.current = load_version(self.settings, self.resolve())
        self._thread = threading.Thread(target=self._follow, name="visiontune-follow",
                                        daemon=True)
        self._thread.start()
        return self.current

    def nudge(self) -> None:
        self._nudge.set()

    def stop(self) -> None:
        self._stop.set()
        self._nudge.set()

    def _say(self, line: str) -> None:
        if line != self._said:
            self._said = line
            log.warning(line)

    def _follow(self) -> None:
        """A check every poll_s seconds (from the start of the last one), or sooner when
        nudged, but nudges no closer than MIN_NUDGE_GAP_S apart."""
        last = time.monotonic()
        while not self._stop.is_set():
            nudged = self._nudge.wait(max(0.0, last + self.settings.poll_s - time.monotonic()))
            if self._stop.is_set():
                return
            if nudged:
                self._stop.wait(max(0.0, last + MIN_NUDGE_GAP_S - time.monotonic()))
                self._nudge.clear()
            last = time.monotonic()
            self.check()

    def check(self) -> None:
        """One look at the registry; a new version is loaded beside and swapped in."""
        now = self.current.version if self.current else None
        try:
            version = self.resolve()
        except Exception as e:   # the registry away, the alias gone, an unrecorded champion
            self._say(f"{first_line(e, None)}; still serving version {now}")
            return
        if self._said.endswith(f"; still serving version {now}"):
            self._said = ""   # answered again: the next outage is said again
        if version == now or version in self.refused:
            return
        log.warning(f"{self.settings.alias} moved {now} -> {version}: loading version "
                    f"{version} beside version {now}")
        try:
            loaded = load_version(self.settings, version)
        except Refused as e:
            if not e.permanent:   # the store did not answer: the next poll tries again
                self._say(f"could not fetch {e}; still serving version {now}, trying again")
                return
            self.refused[version] = str(e)
            log.warning(f"refused {e}; still serving version {now}")
            return
        self.current = loaded   # the swap: requests already running keep their version
        log.warning(f"now serving version {version} (downloaded, verified and warmed in "
                    f"{loaded.seconds:.1f} s; version {now} is released when its last request "
                    f"ends)")


def create_app(follower: Follower):
    """The FastAPI app: MLflow's scoring routes over whatever version `follower` holds."""
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse, Response
    from mlflow.exceptions import MlflowException
    from mlflow.version import VERSION

    max_body = int(os.environ.get(MAX_BODY_ENV) or DEFAULT_MAX_BODY)
    timeout = float(os.environ.get(TIMEOUT_ENV) or 60)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        if follower.current is None:   # a worker process: load before answering
            await asyncio.to_thread(follower.start)
        yield
        follower.stop()

    app = FastAPI(lifespan=lifespan, title="visiontune serve")

    def named(response, served: Loaded):
        response.headers[VERSION_HEADER] = served.version
        response.headers[MODEL_HEADER] = follower.settings.name
        return response

    @app.middleware("http")
    async def name_every_answer(request, call_next):
        """404s, 405s and the visiontune routes too; a scoring answer keeps the version of
        the request (set by the route, which may differ from the current one)."""
        response = await call_next(request)
        if VERSION_HEADER not in response.headers and follower.current is not None:
            named(response, follower.current)
        return response

    @app.get("/ping")
    @app.get("/health")
    async def ping():
        served = follower.current
        if served is None:
            return Response("\n", status_code=503, media_type="application/json")
        return named(Response("\n", status_code=200, media_type="application/json"), served)

    @app.get("/version")
    async def version():
        return named(Response(VERSION, media_type="application/json"), follower.current)

    @app.get("/visiontune/model")
    async def model():
        served, s = follower.current, follower.settings
        return JSONResponse({"model": s.name, "alias": s.alias, "version": served.version,
                             "refused": follower.refused})

    @app.post("/visiontune/refresh", status_code=202)
    async def refresh():
        follower.nudge()   # the body is not read: the registry is the only authority
        return {"checking": True}

    from fastapi import Request

    @app.post("/invocations")
    async def score(request: Request):
        served = follower.current   # this request is answered by this version, whatever moves
        body = await read_body(request, max_body)
        if body is None:
            return named(Response(f"request body over {max_body:,} bytes ({MAX_BODY_ENV})",
                                  status_code=413, media_type="text/plain"), served)
        try:
            result = await asyncio.wait_for(asyncio.to_thread(
                answer, body, request.headers.get("content-type", ""), served), timeout)
            out = Response(result.response, status_code=result.status,
                           media_type=result.mimetype)
        except MlflowException as e:
            out = Response(e.serialize_as_json(), status_code=e.get_http_status_code(),
                           media_type="application/json")
        except (asyncio.TimeoutError, TimeoutError):
            out = Response("Request processing time exceeded limit", status_code=504,
                           media_type="application/json")
        return named(out, served)

    return app


def answer(body: bytes, content_type: str, served: Loaded):
    """MLflow's `scoring_server.invocations`, with one shortcut: the request every image
    client sends (`{"dataframe_split": {"columns": ["image"], "data": [["<base64>"], ...]}}`)
    is parsed here, a third of MLflow's generic parsing (docs/performance.md), and answered
    with MLflow's own `predictions_to_json`. Anything else, and anything that fails on the
    shortcut, goes through MLflow's path, so every error answer is MLflow's."""
    import io

    from mlflow.pyfunc.scoring_server import (
        InvocationsResponse,
        invocations,
        predictions_to_json,
    )

    frame = image_frame(body, content_type)
    if frame is not None:
        try:
            predictions = served.model.predict(frame)
        except Exception:
            return invocations(body, content_type, served.model, served.schema)
        out = io.StringIO()
        predictions_to_json(predictions, out)
        return InvocationsResponse(out.getvalue(), 200, "application/json")
    return invocations(body, content_type, served.model, served.schema)


def image_frame(body: bytes, content_type: str):
    """The DataFrame of image bytes of the common request, or None for any other request
    (strict base64: what this accepts, MLflow's decoding accepts too)."""
    import binascii
    import json

    import pandas as pd

    mime, *parameters = [part.strip() for part in content_type.split(";")]
    if mime != "application/json" or any(p.replace(" ", "").lower() != "charset=utf-8"
                                         for p in parameters):
        return None   # as MLflow parses it: anything else is its to answer (or refuse)
    try:
        doc = json.loads(body)
        split = doc["dataframe_split"]
        if set(doc) != {"dataframe_split"} or set(split) != {"columns", "data"} or \
                split["columns"] != ["image"] or not isinstance(split["data"], list):
            return None
        images = [binascii.a2b_base64(row[0], strict_mode=True) for row in split["data"]
                  if isinstance(row, list) and len(row) == 1 and isinstance(row[0], str)]
    except (ValueError, TypeError, KeyError, binascii.Error):
        return None
    return pd.DataFrame({"image": images}) if len(images) == len(split["data"]) else None


async def read_body(request, limit: int) -> bytes | None:
    """The body, or None as soon as it passes `limit` bytes (never held whole)."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        return None
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


def worker_app():
    """uvicorn's factory in each worker process (`--workers N`): settings from the
    environment the command set; the version is loaded at the worker's start-up."""
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    return create_app(Follower(ServeSettings.from_env()))


LOG_FORMAT = "%(asctime)s visiontune serve [%(process)d]: %(message)s"
