"""Signed HTTP webhooks announcing a move of the `champion` alias (`visiontune promote`,
`rollback`): the check of the configured hooks, the HMAC-SHA256 signature (and `verify`, for
receivers and the docs), the exact body that is signed, the URL form that may be shown, and
`deliver`, which POSTs to each hook with bounded retries and keeps every attempt for the record.

Standard library only: the CLI checks `registry.hooks` without importing MLflow, and a
receiver's author can copy `verify` as it is.
"""

from __future__ import annotations

import hashlib
import hmac
import http.client
import json
import logging
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import asdict, dataclass, field
from email.utils import parsedate_to_datetime
from urllib.parse import urlsplit

from components.errors import ConfigError

SECRET_ENV = "VISIONTUNE_HOOK_SECRET"
SIGNATURE_HEADER = "X-Visiontune-Signature"   # "sha256=<hex of HMAC-SHA256(secret, body)>"
DELIVERY_HEADER = "X-Visiontune-Delivery"     # the delivery id (uuid4 hex), same on every retry
TIMESTAMP_HEADER = "X-Visiontune-Timestamp"   # unix seconds (int) when the delivery was created
EVENT_HEADER = "X-Visiontune-Event"           # "champion.promoted", "champion.rolled_back"
DEFAULT_ATTEMPTS = 4
USER_AGENT = "visiontune-hooks"
MAX_WAIT_S = 30.0   # a command that moved the champion should not hang on one slow receiver
log = logging.getLogger(__name__)


class HookError(ConfigError):
    """Hooks configured wrongly (registry.hooks, the model's own hook tag, the secret): a
    config mistake, one line (exit 2)."""


def check_hooks(urls: list[str], secret: str | None) -> None:
    """Raise HookError for a hook URL that cannot or must not be used, or for hooks without a
    secret to sign with. No hooks need no secret."""
    for url in urls:
        _check_url(url)
    if urls and not secret:
        raise HookError(f"registry.hooks is set but {SECRET_ENV} is not: deliveries are signed; "
                        f"export a shared secret (the receivers check {SIGNATURE_HEADER} with "
                        f"the same one), or remove registry.hooks")


def _check_url(url: str) -> None:
    if not isinstance(url, str) or not url:
        raise HookError(f"registry.hooks: {type(url).__name__} value is not a hook URL")
    # urllib refuses these only when sending, after the champion has already moved
    if any(c.isspace() or ord(c) < 32 or ord(c) == 127 for c in url):
        raise HookError(f"registry.hooks: {shown_url(url)} contains whitespace or control "
                        f"characters; percent-encode them")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise HookError(f"registry.hooks: {shown_url(url)} is not an http:// or https:// URL "
                        f"with a host")
    if parts.username is not None or parts.password is not None:
        raise HookError(f"registry.hooks: {shown_url(url)} carries credentials (user:password@); "
                        f"they go in the receiver's config, not the URL (hook URLs are printed "
                        f"and recorded): the receiver authenticates deliveries by their signature")
    try:
        parts.port
    except ValueError:
        raise HookError(f"registry.hooks: {shown_url(url)} has an invalid port") from None


def sign(body: bytes, secret: str) -> str:
    """The signature header's value for `body`: "sha256=<hex of HMAC-SHA256(secret, body)>"."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def verify(body: bytes, secret: str, signature: str) -> bool:
    """Whether `signature` (the header's value) signs `body` with `secret`; in constant time, so
    a receiver's answers do not reveal how much of a forged signature was right."""
    if not isinstance(signature, str):
        return False
    return hmac.compare_digest(sign(body, secret).encode(), signature.encode("utf-8", "replace"))


def shown_url(url: str) -> str:
    """What of a hook URL may be printed or recorded: scheme://host[:port] and the path's first
    segment, the rest as "/…"; no user info, query or fragment. Slack- and Teams-style hook URLs
    are themselves the credential, in their path or query."""
    parts = urlsplit(url)
    netloc = parts.netloc.rpartition("@")[2]
    prefix = f"{parts.scheme}://{netloc}" if parts.scheme or netloc else ""
    segments = parts.path.split("/")
    path = "/".join(segments[:2])
    if any(segments[2:]):
        path += "/…"
    elif len(segments) > 2:
        path += "/"
    return prefix + path


@dataclass
class Attempt:
    number: int            # 1-based
    status: int | None     # HTTP status; None when there was no answer (refused, timeout)
    error: str | None      # one line: "HTTP 500", "URLError: ...", "timed out after 10 s"
    seconds: float         # how long this attempt took
    at: str                # ISO-8601 UTC, "2026-12-05T15:40:01Z"


@dataclass
class Delivery:
    url: str               # shown_url(url): the full URL may be the receiver's credential
    delivery_id: str
    event: str
    attempts: list[Attempt] = field(default_factory=list)
    delivered: bool = False   # a 2xx answer was received

    def as_dict(self) -> dict:
        return asdict(self)


def payload_body(payload: dict, delivery_id: str, timestamp: int, event: str) -> bytes:
    """The exact bytes sent and signed. The id and timestamp are inside the signed body as well
    as in headers, so a receiver can reject replays without trusting an unsigned header."""
    return json.dumps({**payload, "event": event, "delivery_id": delivery_id,
                       "timestamp": timestamp}, sort_keys=True, separators=(",", ":")).encode()


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    # The signature vouches for a delivery to this URL; following a 3xx would hand the signed
    # body to wherever the receiver (or someone in between) points.
    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None


def deliver(urls: list[str], event: str, payload: dict, secret: str, *,
            attempts: int = DEFAULT_ATTEMPTS, backoff_s: float = 1.0, timeout_s: float = 10.0,
            sleep=time.sleep) -> list[Delivery]:
    """POST the signed `payload` to each URL (one delivery id each), retrying when there is no
    answer, a 5xx, 408 or 429; one log line per URL once its delivery is settled. A receiver's
    failure never raises: it is in the returned Deliveries. Raises HookError before sending
    anything when the hooks are configured wrongly (see `check_hooks`)."""
    check_hooks(urls, secret)
    if attempts < 1:
        raise HookError(f"hook attempts must be at least 1, not {attempts}")
    opener = urllib.request.build_opener(_NoRedirect())
    deliveries = []
    for url in urls:
        delivery = _deliver_one(opener, url, event, payload, secret, attempts=attempts,
                                backoff_s=backoff_s, timeout_s=timeout_s, sleep=sleep)
        deliveries.append(delivery)
        log.info(_summary(delivery, attempts))
    return deliveries


def _deliver_one(opener, url: str, event: str, payload: dict, secret: str, *, attempts: int,
                 backoff_s: float, timeout_s: float, sleep) -> Delivery:
    delivery_id, timestamp = uuid.uuid4().hex, int(time.time())
    # built once: every retry carries the same bytes, id and signature, so a receiver that
    # did get an earlier try can tell this one is a duplicate
    body = payload_body(payload, delivery_id, timestamp, event)
    headers = {"Content-Type": "application/json", "User-Agent": USER_AGENT,
               SIGNATURE_HEADER: sign(body, secret), DELIVERY_HEADER: delivery_id,
               TIMESTAMP_HEADER: str(timestamp), EVENT_HEADER: event}
    delivery = Delivery(shown_url(url), delivery_id, event)
    for number in range(1, attempts + 1):
        at, started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), time.monotonic()
        request = urllib.request.Request(url, data=body, headers=headers, method="POST")
        status, error, retry_after = _attempt(opener, request, timeout_s)
        error = None if error is None else _scrub(error, url, secret)
        delivery.attempts.append(Attempt(number, status, error,
                                         round(time.monotonic() - started, 3), at))
        if status is not None and 200 <= status < 300:
            delivery.delivered = True
            break
        if number == attempts or not _retried(status):
            break
        wait = backoff_s * 2 ** (number - 1)
        if retry_after is not None:
            wait = max(wait, retry_after)
        sleep(min(wait, MAX_WAIT_S))
    return delivery


def _attempt(opener, request, timeout_s: float) -> tuple[int | None, str | None, float | None]:
    """(status, error line, Retry-After seconds) of one POST."""
    timed_out = f"timed out after {timeout_s:g} s"
    try:
        with opener.open(request, timeout=timeout_s) as response:
            return response.status, None, None
    except urllib.error.HTTPError as e:
        with e:
            return e.code, f"HTTP {e.code}", _retry_after(e.headers.get("Retry-After"))
    except TimeoutError:
        return None, timed_out, None
    except urllib.error.URLError as e:
        if isinstance(e.reason, TimeoutError):
            return None, timed_out, None
        return None, f"URLError: {e.reason}", None
    except (OSError, http.client.HTTPException) as e:
        return None, f"{type(e).__name__}: {e}", None


def _retried(status: int | None) -> bool:
    # no answer, or an answer that says "later": anything else would fail the same way again
    return status is None or 500 <= status < 600 or status in (408, 429)


def _retry_after(value: str | None) -> float | None:
    """Seconds a Retry-After header asks for (delta-seconds or an HTTP date); None if absent
    or unreadable."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


def _scrub(text: str, url: str, secret: str) -> str:
    # an exception's text can quote the URL (whose path may be the receiver's credential);
    # the secret is never sent, but a line that is recorded must not be where it first leaks
    shown = shown_url(url)
    if shown != url:
        parts = urlsplit(url)
        tail = url.partition("://")[2][len(parts.netloc):]   # path, query, fragment as sent
        for hidden in (url, tail if len(tail) > 1 else url):
            text = text.replace(hidden, shown)
    if secret:
        text = text.replace(secret, "***")
    return " ".join(text.split())[:300]


def _summary(delivery: Delivery, attempts: int) -> str:
    last = delivery.attempts[-1]
    if delivery.delivered:
        return (f"hook {delivery.url}: delivered (attempt {last.number} of {attempts}, "
                f"HTTP {last.status})")
    why = ""
    if last.status is not None and 300 <= last.status < 400:
        why = "; redirects are not followed: the signature is for this URL"
    elif not _retried(last.status):
        why = "; the receiver refused it, not retried"
    n = len(delivery.attempts)
    return (f"hook {delivery.url}: NOT delivered after {n} attempt{'s' if n != 1 else ''} "
            f"(last: {last.error}{why})")
