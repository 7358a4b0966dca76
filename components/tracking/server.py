"""Whether the tracking server is there: the check before a run starts (a server that is down
from one that is slow), how an error says it did not answer, bounded HTTP retries, and the
driver's watch over a sweep (`StoreWatch`), which rides out an outage while the run's
processes write to the journal (`components.tracking.journal`)."""

from __future__ import annotations

import logging
import os
import re
import time
import urllib.error
import urllib.request

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from components.errors import UserError, first_line

log = logging.getLogger(__name__)
PROBE_EVERY_S = 5.0   # how often a process whose server went away asks whether it is back
# How a server that is away (stopped, restarting, overloaded) shows through MLflow's client.
_UNREACHABLE = re.compile(r"Max retries exceeded|Connection (refused|aborted|reset)|timed out|"
                          r"RemoteDisconnected|Failed to establish|TEMPORARILY_UNAVAILABLE|"
                          r"too many 50\d error")
# ... and which of those say it is there but busy (restarting its workers, overloaded).
_SLOW = re.compile(r"timed out|RemoteDisconnected|Connection (aborted|reset)|"
                   r"too many 50\d error|TEMPORARILY_UNAVAILABLE|\b50[234]\b")

# MLflow's own defaults (7 retries, backoff factor 2, 120 s per request) make every call to a
# server that went away block for minutes; these bound one call to well under a minute.
# A value the user exported wins.
HTTP_RETRY_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3",
                  "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                  "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}


class TrackingError(UserError, RuntimeError):
    """The tracking store cannot be used: an unsupported URI, a server that does not answer."""


def bound_http_retries() -> dict[str, str]:
    """Export bounded MLflow HTTP retries to this process and the Ray processes it starts;
    returns the values in force (a submitted job gets them in its runtime_env)."""
    for key, value in HTTP_RETRY_ENV.items():
        os.environ.setdefault(key, value)
    return {key: os.environ[key] for key in HTTP_RETRY_ENV}


def is_unreachable(error: BaseException) -> bool:
    """The server did not answer (refused, reset, timed out, 502/503/504): worth waiting for,
    unlike an answer that refuses the request."""
    import requests

    if isinstance(error, (requests.exceptions.ConnectionError, requests.exceptions.Timeout,
                          ConnectionError, TimeoutError)):
        return True
    return isinstance(error, MlflowException) and bool(_UNREACHABLE.search(str(error)))


def server_answers(uri: str, timeout_s: float = 3.0) -> bool:
    """One quick question to a tracking server (`/health`); a local store always answers."""
    if not uri.startswith(("http://", "https://")):
        return True
    try:
        urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout_s).close()
        return True
    except urllib.error.HTTPError as e:
        return e.code < 500   # it answered (an auth proxy's 401 included)
    except OSError:
        return False


def _ask(uri: str, timeout_s: float) -> tuple[str, bool] | None:
    """None when the store answers one real call (without MLflow's retries); else the reason
    and whether it says the server is there but slow."""
    saved = {k: os.environ.get(k) for k in HTTP_RETRY_ENV}
    os.environ.update({"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
                       "MLFLOW_HTTP_REQUEST_TIMEOUT": str(int(max(timeout_s, 1)))})
    try:
        MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
        return None
    except Exception as e:  # unsupported scheme, refused connection, missing driver, bad auth
        text = str(e)
        # A refused or timed-out connection is buried in urllib3's text; say just that.
        refused = re.search(r"\[Errno -?\d+\] [^\"')(]+|timed out", text)
        reason = refused.group(0).strip() if refused else first_line(e)
        return reason, bool(_SLOW.search(text)) and "Connection refused" not in text
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def check_tracking_uri(uri: str, timeout_s: float = 10, slow_grace_s: float = 0) -> None:
    """An unsupported scheme or a server that is down (nothing listens) fails here at once,
    before Ray starts or any data is read. A server that is there but slow (it timed out or
    answered 502/503/504, as one restarting its workers under load does) is asked again
    for up to `slow_grace_s`, with one line saying so; the error says which it was."""
    started = time.monotonic()
    said = False
    while True:
        failed = _ask(uri, timeout_s)
        if failed is None:
            if said:
                log.info(f"[visiontune] the tracking server answered after "
                         f"{time.monotonic() - started:.0f} s")
            return
        reason, slow = failed
        waited = time.monotonic() - started
        if not slow or waited >= slow_grace_s:
            kind = (f"slow: no answer for {waited:.0f} s" if slow and slow_grace_s else
                    "slow" if slow else "down")
            raise TrackingError(f"cannot use the MLflow tracking store tracking.uri={uri}: "
                                f"{reason} (the server is {kind})")
        if not said:
            log.warning(f"[visiontune] the tracking server is slow to answer ({reason}): "
                        f"asking again for up to {slow_grace_s:.0f} s")
            said = True
        time.sleep(min(2.0, max(0.0, slow_grace_s - waited)))


class StoreWatch:
    """Polled from a long loop (the sweep), at most one check every `every_s` seconds.

    Without a journal (`tracking.outage_grace_s=0`) the store is lost after `failures` checks
    in a row failed: the sweep stops. With one, the sweep rides out an outage: one line when
    it starts (trials keep training and journal what they log), one when the server is back
    (and every process's journaled records are sent); lost only after `grace_s` down."""

    def __init__(self, tracker, every_s: float = 10.0, failures: int = 2):
        self.tracker, self.every_s, self.failures = tracker, every_s, failures
        journal = tracker.journal
        self.grace_s = journal.grace_s if journal is not None else 0.0
        self._last, self._failed = time.monotonic(), 0
        self.down_since: float | None = None   # time.time() of the first failed check
        self.outages: list[float] = []         # seconds of each outage ridden out

    def lost(self) -> bool:
        if time.monotonic() - self._last >= self.every_s and not self._gone():
            self._last = time.monotonic()
            if _ask(self.tracker.uri, 5) is None:
                self._answered()
            else:
                self._failed += 1
                if self.grace_s and self.down_since is None:
                    self.down_since = time.time()
                    waiting = self.tracker.journal.count()
                    log.warning(f"[visiontune] tracking server unreachable since "
                                f"{time.strftime('%H:%M:%S', time.localtime(self.down_since))}"
                                f": training continues, {waiting} records waiting")
        return self._gone()

    def _gone(self) -> bool:
        if not self.grace_s:
            return self._failed >= self.failures
        return self.down_since is not None and time.time() - self.down_since > self.grace_s

    def _answered(self) -> None:
        self._failed = 0
        if self.down_since is None:
            return
        try:
            sent = self.tracker.send_journal()
        except Exception as e:
            if is_unreachable(e):
                return   # gone again before everything was sent
            raise
        down = time.time() - self.down_since
        self.outages.append(down)
        self.down_since = None
        log.info(f"[visiontune] tracking server back after {down:.0f} s: {sent} journaled "
                 f"records sent")


def wait_and_send(tracker, pipeline_id: str) -> None:
    """Before anything acts on the record (evaluation, registration): wait for the server (for
    at most the journal's grace) and send every journaled record. A run without a journal
    has nothing to wait for."""
    journal = tracker.journal
    if journal is None:
        return
    started = time.monotonic()
    while True:
        if server_answers(tracker.uri):
            try:
                sent = tracker.send_journal()
                if sent:
                    log.info(f"[visiontune] {sent} journaled records sent to the tracking "
                             "server")
                return
            except Exception as e:
                if not is_unreachable(e):
                    raise
        if time.monotonic() - started > journal.grace_s:
            raise TrackingError(
                f"the tracking server {tracker.uri} has not answered for "
                f"{journal.grace_s:.0f} s; {journal.count()} records wait in {journal.root}: "
                f"once it is back, visiontune run --resume {pipeline_id} sends them and goes on")
        time.sleep(PROBE_EVERY_S)
