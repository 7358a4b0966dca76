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


def uri_secret(uri: str | None) -> str | None:
    """What in `uri` is a credential (user info, a secret query option), or None. The answer
    names the kind, never the value."""
    from urllib.parse import parse_qsl, urlsplit

    if not storage.is_uri(uri):
        return None
    try:
        parts = urlsplit(uri)
        has_user = parts.username is not None or parts.password is not None
    except ValueError:   # unparseable (e.g. an unclosed '['): look for user info by hand
        authority = uri.split("://", 1)[1].split("/", 1)[0]
        return "a user name or password before '@'" if "@" in authority else None
    if has_user:
        return "a user name or password before '@'"
    keys = [k for k, _ in parse_qsl(parts.query, keep_blank_values=True)
            if k.lower() in _SECRET_QUERY]
    return f"the query option {keys[0]}" if keys else None


def masked(uri: str) -> str:
    """`uri` as it may be printed: user info and query replaced by ***."""

    scheme, _, rest = uri.partition("://")
    authority, slash, path = rest.partition("/")
    path, q, _ = path.partition("?")
    user, at, host = authority.rpartition("@")
    return f"{scheme}://{'***@' if at else ''}{host}{slash}{path}" + ("?***" if q else "")


def check_no_credentials(key: str, uri: str | None) -> None:
    """A credential inside a URI would be logged as a run parameter (readable by every user of
    the tracking server), written into manifests and printed in errors: refused."""
    what = uri_secret(uri)
    if what:
        raise ConfigError(f"{key}={masked(uri)} carries credentials ({what}): a URI is "
                          f"recorded in MLflow and printed; {_CREDENTIALS_HINT}")
