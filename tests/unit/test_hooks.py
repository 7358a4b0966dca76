"""The champion hooks against a real HTTP receiver on 127.0.0.1 (a ThreadingHTTPServer in a
thread): what is sent, signed and retried, what is recorded, and what never leaks. Backoff
waits go to a list instead of sleeping, so the file runs in a few seconds."""

from __future__ import annotations

import hashlib
import hmac
import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from components.registry.hooks import (
    DELIVERY_HEADER,
    EVENT_HEADER,
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    HookError,
    check_hooks,
    deliver,
    shown_url,
    verify,
)
from tests.conftest import log_lines

SECRET = "s3cret-PLANTED-hook-key"
PAYLOAD = {"model": "digits", "version": "3", "previous": "2"}
EVENT = "champion.promoted"


class Receiver:
    """Records each request (path, headers, body) and answers with the next scripted status
    (the last one repeats); `delay_s` holds the answer back, for timeouts."""

    def __init__(self, statuses, delay_s: float = 0.0, headers: dict | None = None):
        self.statuses, self.delay_s, self.headers = list(statuses), delay_s, headers or {}
        self.requests: list[dict] = []
        self.lock, self.stop = threading.Lock(), threading.Event()
        self.port = 0

    def url(self, path: str = "/hook") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def answer(self, handler: BaseHTTPRequestHandler) -> None:
        body = handler.rfile.read(int(handler.headers.get("Content-Length", 0)))
        with self.lock:
            self.requests.append({"method": handler.command, "path": handler.path,
                                  "headers": dict(handler.headers), "body": body})
            status = self.statuses.pop(0) if len(self.statuses) > 1 else self.statuses[0]
        if self.delay_s:
            self.stop.wait(self.delay_s)
        if status == "echo":   # a broken receiver whose garbage quotes the secret path
            handler.close_connection = True
            handler.wfile.write(f"BOGUS {handler.path}\r\n\r\n".encode())
            return
        handler.send_response(status)
        if 300 <= status < 400:
            handler.send_header("Location", "/elsewhere")
        for name, value in self.headers.items():
            handler.send_header(name, value)
        handler.send_header("Content-Length", "0")
        handler.end_headers()


class _Quiet(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        pass   # a client that timed out leaves a broken pipe behind: expected here


@pytest.fixture
def receiver(monkeypatch):
    """A factory: receiver([500, 200]) starts one; all are shut down after the test, passed or
    failed."""
    for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy",
                 "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)   # requests must reach 127.0.0.1 directly
    started = []

    def start(statuses, **kwargs) -> Receiver:
        rec = Receiver(statuses, **kwargs)

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                rec.answer(self)

            def do_GET(self):
                rec.answer(self)

            def log_message(self, *args):
                pass

        server = _Quiet(("127.0.0.1", 0), Handler)
        rec.port = server.server_address[1]
        thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
        thread.start()
        started.append((server, thread, rec))
        return rec

    try:
        yield start
    finally:
        for server, thread, rec in started:
            rec.stop.set()
            server.shutdown()
            server.server_close()
            thread.join(5)


def _signature(body: bytes) -> str:
    return "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()


def _deliver(urls, **kwargs):
    slept = []
    with log_lines("components.registry.hooks") as lines:   # a line per URL, logged
        out = deliver(urls, EVENT, PAYLOAD, SECRET, sleep=slept.append, **kwargs)
    return out, slept, lines


def test_a_retry_after_a_500_sends_the_same_signed_delivery(receiver):
    rec = receiver([500, 200])
    [d], slept, lines = _deliver([rec.url()])
    assert len(rec.requests) == 2 and slept == [1.0]
    first, second = rec.requests
    assert first["body"] == second["body"]
    assert first["headers"][DELIVERY_HEADER] == second["headers"][DELIVERY_HEADER] == d.delivery_id
    for r in rec.requests:
        h = r["headers"]
        assert r["method"] == "POST" and r["path"] == "/hook"
        assert h[SIGNATURE_HEADER] == _signature(r["body"])
        assert verify(r["body"], SECRET, h[SIGNATURE_HEADER])
        assert h["Content-Type"] == "application/json" and h["User-Agent"] == "visiontune-hooks"
        assert h[EVENT_HEADER] == EVENT
    body = json.loads(first["body"])
    assert body == {**PAYLOAD, "event": EVENT, "delivery_id": d.delivery_id,
                    "timestamp": int(first["headers"][TIMESTAMP_HEADER])}
    assert d.delivered and d.event == EVENT and d.url == rec.url()
    assert [(a.number, a.status, a.error) for a in d.attempts] == [(1, 500, "HTTP 500"),
                                                                  (2, 200, None)]
    assert all(a.at.endswith("Z") and a.seconds >= 0 for a in d.attempts)
    assert lines == [f"hook {rec.url()}: delivered (attempt 2 of 4, HTTP 200)"]


def test_a_receiver_that_keeps_failing_gets_every_attempt_with_backoff(receiver):
    rec = receiver([500])
    [d], slept, lines = _deliver([rec.url()], attempts=3, backoff_s=1)
    assert len(rec.requests) == 3 and slept == [1, 2]
    assert not d.delivered and [a.status for a in d.attempts] == [500, 500, 500]
    assert lines == [f"hook {rec.url()}: NOT delivered after 3 attempts (last: HTTP 500)"]


def test_backoff_is_capped_and_retry_after_is_honoured(receiver):
    rec = receiver([503], headers={"Retry-After": "7"})
    _, slept, _ = _deliver([rec.url()], attempts=3, backoff_s=1)
    assert slept == [7, 7]
    rec = receiver([429], headers={"Retry-After": "3600"})
    _, slept, _ = _deliver([rec.url()], attempts=4, backoff_s=20)
    assert slept == [30, 30, 30]


def test_a_refusal_is_not_retried(receiver):
    rec = receiver([404])
    [d], slept, lines = _deliver([rec.url()])
    assert len(rec.requests) == 1 and slept == []
    assert not d.delivered and [(a.status, a.error) for a in d.attempts] == [(404, "HTTP 404")]
    assert "NOT delivered after 1 attempt " in lines[0] and "refused" in lines[0]


def test_a_408_is_retried_and_a_204_is_delivered(receiver):
    rec = receiver([408, 204])
    [d], slept, _ = _deliver([rec.url()])
    assert d.delivered and [a.status for a in d.attempts] == [408, 204] and slept == [1.0]


def test_a_closed_port_is_recorded_without_raising():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    [d], slept, lines = _deliver([f"http://127.0.0.1:{port}/hook"], attempts=2)
    assert not d.delivered and slept == [1.0]
    assert [a.status for a in d.attempts] == [None, None]
    assert all(a.error and "\n" not in a.error for a in d.attempts)
    assert "refused" in d.attempts[0].error.lower()
    assert "NOT delivered after 2 attempts" in lines[0]


def test_a_slow_receiver_times_out(receiver):
    rec = receiver([200], delay_s=2.0)
    [d], slept, _ = _deliver([rec.url()], attempts=1, timeout_s=0.5)
    assert not d.delivered and slept == []
    [a] = d.attempts
    assert a.status is None and a.error == "timed out after 0.5 s"
    assert 0.4 < a.seconds < 1.9


def test_a_redirect_is_not_followed(receiver):
    rec = receiver([302, 200])
    [d], slept, lines = _deliver([rec.url()])
    assert [r["path"] for r in rec.requests] == ["/hook"] and slept == []
    assert not d.delivered and [a.status for a in d.attempts] == [302]
    assert "redirects are not followed" in lines[0]


def test_each_url_gets_its_own_delivery(receiver):
    rec = receiver([200])
    deliveries, _, lines = _deliver([rec.url("/a"), rec.url("/b")])
    assert [d.delivered for d in deliveries] == [True, True] and len(lines) == 2
    ids = [d.delivery_id for d in deliveries]
    assert len(set(ids)) == 2
    assert [(r["path"], r["headers"][DELIVERY_HEADER]) for r in rec.requests] == \
        list(zip(["/a", "/b"], ids))


def test_the_secret_and_the_full_url_never_leak(receiver):
    rec = receiver([500, 200])
    url = rec.url(f"/services/T000/B000/{SECRET}?token={SECRET}")
    garbage = receiver(["echo"]).url(f"/services/T000/{SECRET}?token=1")
    deliveries, _, lines = _deliver([url, "http://127.0.0.1:9/x/" + SECRET, garbage],
                                    attempts=2)
    assert deliveries[2].attempts[0].error.startswith("BadStatusLine: BOGUS http://")
    recorded = json.dumps([d.as_dict() for d in deliveries]) + "\n".join(lines)
    assert SECRET not in recorded and "T000" not in recorded and "token" not in recorded
    assert deliveries[0].delivered and deliveries[0].url == rec.url("/services/…")
    assert all(SECRET.encode() not in r["body"] and SECRET not in str(r["headers"])
               for r in rec.requests)
    assert json.loads(json.dumps(deliveries[0].as_dict()))["attempts"][0]["status"] == 500


def test_check_hooks():
    with pytest.raises(HookError, match="VISIONTUNE_HOOK_SECRET"):
        check_hooks(["https://hooks.example.com/x"], None)
    with pytest.raises(HookError, match="VISIONTUNE_HOOK_SECRET"):
        check_hooks(["https://hooks.example.com/x"], "")
    with pytest.raises(HookError, match="http:// or https://"):
        check_hooks(["ftp://hooks.example.com/x"], SECRET)
    with pytest.raises(HookError, match="http:// or https://"):
        check_hooks(["https:///no-host"], SECRET)
    with pytest.raises(HookError, match="credentials") as e:
        check_hooks(["https://user:PLANTED@hooks.example.com/x"], SECRET)
    assert "PLANTED" not in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(HookError, match="VISIONTUNE_HOOK_SECRET"):
        deliver(["https://hooks.example.com/x"], EVENT, PAYLOAD, "")
    check_hooks([], None)
    check_hooks(["http://127.0.0.1:8080/hook", "https://hooks.example.com/a/b?c=d"], SECRET)


def test_shown_url():
    assert shown_url("https://hooks.example.com/services/T000/B000/XXXX?x=1") == \
        "https://hooks.example.com/services/…"
    assert shown_url("http://127.0.0.1:8080/hook") == "http://127.0.0.1:8080/hook"
    assert shown_url("http://127.0.0.1:8080/hook?key=1#f") == "http://127.0.0.1:8080/hook"
    assert shown_url("https://u:pw@hooks.example.com/a/b") == "https://hooks.example.com/a/…"
    assert shown_url("https://hooks.example.com") == "https://hooks.example.com"


def test_verify_rejects_what_was_not_signed_with_the_secret():
    body = b'{"event":"champion.promoted"}'
    assert verify(body, SECRET, _signature(body))
    assert not verify(body + b" ", SECRET, _signature(body))
    assert not verify(body, "other", _signature(body))
    assert not verify(body, SECRET, "sha256=")
    assert not verify(body, SECRET, "sha256=é")
