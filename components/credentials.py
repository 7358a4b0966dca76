"""Credentials never travel in a URI: a URI is recorded with every run, path and log line.
What counts as a credential in a URI, how a URI is shown with them masked, and the check."""

from __future__ import annotations

from components import storage
from components.errors import ConfigError

_CREDENTIALS_HINT = ("put credentials in the environment (AWS_ACCESS_KEY_ID / "
                     "AWS_SECRET_ACCESS_KEY or ~/.aws/credentials for s3://, "
                     "GOOGLE_APPLICATION_CREDENTIALS for gs://, MLFLOW_TRACKING_USERNAME / "
                     "MLFLOW_TRACKING_PASSWORD or MLFLOW_TRACKING_TOKEN for the tracking server)")
_SECRET_QUERY = ("access_key", "secret_key", "session_token", "token", "password", "secret",
                 "sig", "signature", "x-amz-signature", "x-amz-credential",
                 "x-amz-security-token", "x-goog-signature", "x-goog-credential",
                 "googleaccessid", "api_key", "apikey", "access_token", "account_key")
URI_KEYS = ("data.path", "data.test_path", "tracking.uri", "tracking.artifact_location",
            "ray.storage_path", "ray.address")


def _userinfo_end(rest: str) -> int:
    """In `rest` (a URI after its `scheme://`), the index of the '@' that ends a user name or
    password, or -1. Not `urlsplit`'s view: it ends the authority at the first '/', '?' or
    '#', and half of all AWS secret keys hold a '/' (`s3://AKIA..:wJalr/K7MD..@bucket/x`
    would read as host 'AKIA..' and a path). So whatever comes before the first '@' is taken
    as `user:password` when it holds a ':' that is neither in a path (a '/' before it) nor a
    port followed by a path (`host:5000/a@b`); a bare `user@` counts as urlsplit counts it."""
    at = rest.find("@")
    if at < 0:
        return -1
    before = rest[:at]
    head, colon, tail = before.partition(":")
    if not colon:
        return -1 if any(c in before for c in "/?#") else at
    if any(c in head for c in "/?#"):
        return -1
    port, slash, _ = tail.partition("/")
    return -1 if port.isdigit() and slash else at


def uri_secret(uri: str | None) -> str | None:
    """What in `uri` is a credential (user info, a secret query option), or None. The answer
    names the kind, never the value."""
    from urllib.parse import parse_qsl

    if not storage.is_uri(uri):
        return None
    rest = uri.split("://", 1)[1]
    if _userinfo_end(rest) >= 0:
        return "a user name or password before '@'"
    query = rest.partition("?")[2].partition("#")[0]
    keys = [k for k, _ in parse_qsl(query, keep_blank_values=True)
            if k.lower() in _SECRET_QUERY]
    return f"the query option {keys[0]}" if keys else None


def masked(uri: str) -> str:
    """`uri` as it may be printed: user info, query and fragment replaced by ***."""
    scheme, sep, rest = uri.partition("://")
    end = _userinfo_end(rest)
    if end >= 0:
        rest = "***@" + rest[end + 1:]
    rest, q, _ = rest.partition("?")
    rest, h, _ = rest.partition("#")
    return f"{scheme}{sep}{rest}" + ("?***" if q else "#***" if h else "")


def check_no_credentials(key: str, uri: str | None) -> None:
    """A credential inside a URI would be logged as a run parameter (readable by every user of
    the tracking server), written into manifests and printed in errors: refused."""
    what = uri_secret(uri)
    if what:
        raise ConfigError(f"{key}={masked(uri)} carries credentials ({what}): a URI is "
                          f"recorded in MLflow and printed; {_CREDENTIALS_HINT}")
