"""One filesystem layer for everything that may live in object storage: Ray's `storage_path`
(checkpoints), image folders, and checkpoints read back for evaluation.

It is `pyarrow.fs`, the layer Ray Train itself writes checkpoints with, so one set of
credentials and settings serves both: for S3 the standard AWS variables (`AWS_ACCESS_KEY_ID`,
`AWS_SECRET_ACCESS_KEY`, `AWS_DEFAULT_REGION`, `AWS_ENDPOINT_URL` for MinIO or another
S3-compatible server) or query options in the URI (`s3://b/p?endpoint_override=...`); for
`gs://` Google's application default credentials. Plain paths are local files.

Paths are never joined with `pathlib` when they may be URIs: `Path("s3://b/x")` is `s3:/b/x`.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

from components.errors import UserError

BUCKET_SCHEMES = ("s3", "gs", "gcs")  # paths inside them start with the bucket
# Query options that would carry credentials into every recorded path (MLflow params, manifests).
SECRET_OPTIONS = ("access_key", "secret_key", "session_token")


class StorageError(UserError, OSError):
    """A storage URI that cannot be used (unknown scheme, missing bucket, no access)."""


def is_uri(path: str | Path | None) -> bool:
    return path is not None and "://" in str(path)


def _split_query(uri: str) -> tuple[str, str]:
    base, sep, query = uri.partition("?")
    return base, sep + query


def join(base: str, *parts: str) -> str:
    """`base`/part/...: a URI stays a URI (its `?query` stays at the end); a local path is
    joined as a path."""
    if not is_uri(base):
        return str(Path(base, *parts))
    head, query = _split_query(str(base))
    pieces = [head.rstrip("/")] + [str(p).strip("/") for p in parts if str(p).strip("/")]
    return "/".join(pieces) + query


def _fs_key(uri: str) -> tuple[str, str, str]:
    u = urlsplit(uri)
    return u.scheme, u.netloc, u.query


@functools.lru_cache(maxsize=16)
def _filesystem(scheme: str, netloc: str, query: str):
    """(filesystem, function turning a URI into a path inside it). pyarrow's own filesystems
    first (what Ray writes checkpoints with); any other fsspec protocol through pyarrow's
    fsspec handler, as Ray does for its storage_path."""
    import pyarrow.fs as pafs

    uri = f"{scheme}://{netloc}/" + (f"?{query}" if query else "")
    try:
        fs, _ = pafs.FileSystem.from_uri(uri)
    except Exception as arrow_error:  # ArrowInvalid: unrecognized scheme, bad options, ...
        reason = str(arrow_error).splitlines()[0] if str(arrow_error) else type(arrow_error)
        if "nrecognized filesystem type" not in str(arrow_error):
            # A scheme pyarrow knows but cannot open (options, region, credentials): its
            # own reason, not a second library's attempt.
            raise StorageError(f"cannot open {scheme}://{netloc}: {reason}") from arrow_error
        try:
            import fsspec

            ffs = fsspec.filesystem(scheme)
        except Exception:
            raise StorageError(f"cannot open {scheme}://{netloc}: {reason}") from arrow_error
        # fsspec's public form of the filesystem class's own path rule.
        return (pafs.PyFileSystem(pafs.FSSpecHandler(ffs)),
                lambda u: fsspec.core.strip_protocol(u).rstrip("/") or "/")

    def inner(u: str) -> str:
        parts = urlsplit(u)
        # Bucket stores name paths from the bucket on; others (hdfs://host:port/p) from /.
        p = f"{parts.netloc}{parts.path}" if scheme in BUCKET_SCHEMES else parts.path
        return p.rstrip("/") or "/"
    return fs, inner


def resolve(path: str | Path):
    """(pyarrow filesystem, path inside it) for a URI or a local path. One filesystem object
    per bucket and options: opening one per file would repeat S3 region lookups."""
    import pyarrow.fs as pafs

    path = str(path)
    if not is_uri(path) or path.startswith("file://"):
        local = path[len("file://"):] if path.startswith("file://") else path
        return pafs.LocalFileSystem(), str(Path(local).expanduser().resolve())
    scheme, netloc, query = _fs_key(path)
    secrets = [k for k in SECRET_OPTIONS if f"{k}=" in query]
    if secrets:
        raise StorageError(f"{scheme}://{netloc}: credentials in the URI ({', '.join(secrets)}) "
                           "would be recorded with every path; use the AWS_* variables (or "
                           "the instance's role) instead")
    fs, inner = _filesystem(scheme, netloc, query)
    return fs, inner(_split_query(path)[0])


def read_bytes(path: str | Path) -> bytes:
    fs, p = resolve(path)
    with fs.open_input_stream(p) as f:
        return f.read()


def open_input(path: str | Path):
    """A binary, readable stream (a context manager): one GET on object storage."""
    fs, p = resolve(path)
    return fs.open_input_stream(p)


def file_type(path: str | Path) -> str:
    """'file', 'dir' or 'missing'."""
    import pyarrow.fs as pafs

    fs, p = resolve(path)
    t = fs.get_file_info(p).type
    return {pafs.FileType.File: "file", pafs.FileType.Directory: "dir"}.get(t, "missing")


def list_files(root: str | Path) -> Iterator[str]:
    """Every file under `root` (recursively), each named the way `root` is (URI or path),
    in no particular order."""
    import pyarrow.fs as pafs

    root = str(root)
    fs, p = resolve(root)
    head, query = _split_query(root) if is_uri(root) else (root, "")
    for info in fs.get_file_info(pafs.FileSelector(p, recursive=True)):
        if info.type != pafs.FileType.File:
            continue
        rel = info.path[len(p):].lstrip("/")
        yield (join(head + query, rel) if is_uri(root) else str(Path(p, rel)))


def uri_in(storage_path: str, fs_path: str | None) -> str | None:
    """A path Ray reports inside the storage filesystem (Train's `checkpoint.path` has no
    scheme: `bucket/ray/...` for S3), as a URI on the same storage as `storage_path`."""
    if fs_path is None or not is_uri(storage_path) or is_uri(fs_path):
        return fs_path
    scheme, netloc, query = _fs_key(storage_path)
    if scheme in BUCKET_SCHEMES:  # the path starts with the bucket
        uri = f"{scheme}://{fs_path.lstrip('/')}"
    else:                         # filesystems with a host, e.g. hdfs://host:port/path
        uri = f"{scheme}://{netloc}/{fs_path.lstrip('/')}"
    return uri + (f"?{query}" if query else "")


def check_writable(storage_path: str) -> None:
    """Fail early, with the storage's own reason, when `storage_path` cannot be written: a
    missing bucket or no credentials would otherwise fail every trial one by one."""
    import uuid

    import pyarrow.fs as pafs

    try:
        fs, p = resolve(storage_path)
        # Unique: two pipelines starting on one storage path must not remove each other's.
        probe = f"{p.rstrip('/')}/.visiontune-write-check-{uuid.uuid4().hex[:12]}"
        if isinstance(fs, pafs.LocalFileSystem):  # object stores need no folders
            fs.create_dir(p, recursive=True)
        with fs.open_output_stream(probe) as f:
            f.write(b"ok")
        fs.delete_file(probe)
    except Exception as e:  # OSError, ArrowInvalid, ...
        raise StorageError(f"ray.storage_path={storage_path} is not writable: "
                           f"{str(e).splitlines()[0]}") from e
