"""The tracking journal: what a pipeline run's processes log while the MLflow tracking server
does not answer, kept on the run's storage until the server takes it.

Where: `<ray.storage_path>/<pipeline_id>/journal/` (a local folder or a bucket prefix), one
folder per process that writes (`<host>-<pid>-<random>`), one file per record:
`<writer>/<seq:09d>.json`. A record is JSON:

    {"v": 1, "t": <ms since the epoch when it was logged>, "writer": "...", "seq": 7,
     "op": "metrics", "args": [run_id, {"val_f1": 0.91}, 3, 1764921321000],
     "sha256": "<hex digest of the record without this field, keys sorted>"}

`op` names a write of `Tracker` (params, metrics, tags, text, artifact, end, end_if_running,
close_trial); a metric keeps its original step and timestamp; an artifact's bytes travel in
the record (`args[1]` base64, with their own sha256).

Written whole, then published: a local record is written under a dot-name, fsynced and
renamed; a bucket's PUT is atomic. A reader skips dot-names and drops a record whose digest
does not match (a torn write), with a warning, so a half-written record is never sent.

Sent in (t, writer, seq) order, by the process that wrote it as soon as the server answers
again, and by the pipeline's driver for every writer (a process that died during the outage;
at the end of the sweep; first thing on `--resume`). A record is deleted once the server took
it. Sending twice is harmless: MLflow keeps one copy of a metric with the same key, step,
timestamp and value; a param or tag set again to its value, an artifact uploaded again to its
path and a status set again change nothing.
"""

from __future__ import annotations

import base64
import errno
import hashlib
import json
import os
import re
import shutil
import socket
import time
import uuid
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from components import storage
from components.errors import UserError

VERSION = 1
_NO_SPACE = re.compile(r"No space left on device|ENOSPC|Disk quota exceeded|no space left")


class JournalError(UserError, OSError):
    """The journal cannot be written (a full disk, no access): the run cannot keep its record
    while the server is away."""


@dataclass(frozen=True)
class Record:
    t: int
    writer: str
    seq: int
    op: str
    args: list
    path: str

    @property
    def order(self) -> tuple[int, str, int]:
        return self.t, self.writer, self.seq


def _digest(body: dict) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def no_space(error: BaseException | str | None) -> bool:
    """Whether an error (or its text, or one it was raised from) says a disk is full."""
    seen = 0
    while isinstance(error, BaseException) and seen < 8:
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if _NO_SPACE.search(str(error)):
            return True
        error, seen = error.__cause__ or error.__context__, seen + 1
    return isinstance(error, str) and bool(_NO_SPACE.search(error))


def free_space(path: str) -> str:
    """The free space of the local filesystem holding `path` (or its nearest existing
    parent), as people write it; '?' for object storage."""
    if storage.is_uri(path):
        return "?"
    p = Path(path)
    while not p.exists() and p != p.parent:
        p = p.parent
    free = shutil.disk_usage(p).free
    for unit in ("B", "KB", "MB", "GB"):
        if free < 1024 or unit == "GB":
            return f"{free:.0f} {unit}" if unit == "B" else f"{free:.1f} {unit}"
        free /= 1024
    return "?"


class Journal:
    """One pipeline run's journal (module docstring). Picklable: a trial or a Train worker
    gets a copy that writes under its own writer name."""

    def __init__(self, root: str, grace_s: float = 900.0):
        self.root, self.grace_s = str(root), float(grace_s)
        self._writer: str | None = None
        self._seq = 0
        self.down_since: float | None = None   # this process saw the server go (time.time())
        self.probed = 0.0                      # when this process last asked the server

    def __getstate__(self):
        return {"root": self.root, "grace_s": self.grace_s}

    def __setstate__(self, state):
        self.__init__(state["root"], state["grace_s"])

    @property
    def writer(self) -> str:
        if self._writer is None:
            self._writer = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        return self._writer

    # ------------------------------------------------------------------ writing
    def append(self, op: str, args: list) -> None:
        """Publish one record (after every earlier one of this process)."""
        if op == "artifact":  # the file may be gone when the record is sent: carry its bytes
            run_id, local_path, artifact_path = args
            data = Path(local_path).read_bytes()
            args = [run_id, base64.b64encode(data).decode(), hashlib.sha256(data).hexdigest(),
                    Path(local_path).name, artifact_path]
            op = "artifact_bytes"
        self._seq += 1
        body = {"v": VERSION, "t": int(time.time() * 1000), "writer": self.writer,
                "seq": self._seq, "op": op, "args": args}
        text = json.dumps({**body, "sha256": _digest(body)})
        self._publish(storage.join(self.root, self.writer, f"{self._seq:09d}.json"), text)

    def _publish(self, path: str, text: str) -> None:
        try:
            if storage.is_uri(path):
                fs, inner = storage.resolve(path)
                with fs.open_output_stream(inner) as f:   # one PUT: all or nothing
                    f.write(text.encode())
                return
            final = Path(path)
            final.parent.mkdir(parents=True, exist_ok=True)
            tmp = final.with_name(f".{final.name}.tmp")
            with open(tmp, "w") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, final)
        except OSError as e:
            Path(path).with_name(f".{Path(path).name}.tmp").unlink(missing_ok=True)
            full = e.errno in (errno.ENOSPC, errno.EDQUOT)
            raise JournalError(
                e.errno, f"cannot write the tracking journal at {self.root}: "
                f"{'no space left' if full else e.strerror or e} (free: "
                f"{free_space(self.root)})") from None

    # ------------------------------------------------------------------ reading
    def records(self, writer: str | None = None) -> list[Record]:
        """Every published, intact record (of one writer), in sending order."""
        root = storage.join(self.root, writer) if writer else self.root
        if storage.file_type(root) != "dir":
            return []
        out = []
        for path in storage.list_files(root):
            name = path.rsplit("/", 1)[-1]
            if name.startswith(".") or not name.endswith(".json"):
                continue
            record = self._read(path)
            if record is not None:
                out.append(record)
        return sorted(out, key=lambda r: r.order)

    @staticmethod
    def _read(path: str) -> Record | None:
        try:
            doc = json.loads(storage.read_bytes(path))
            digest = doc.pop("sha256")
            if _digest(doc) != digest:
                raise ValueError("digest mismatch")
            return Record(doc["t"], doc["writer"], doc["seq"], doc["op"], doc["args"], path)
        except FileNotFoundError:   # sent and deleted by another sender meanwhile
            return None
        except (ValueError, KeyError, TypeError, OSError) as e:
            warnings.warn(f"tracking journal: dropped the torn record {path} ({e})",
                          stacklevel=2)
            return None

    def count(self) -> int:
        return len(self.records())

    def max_step(self, run_id: str, key: str) -> int:
        """The last step of metric `key` of `run_id` still waiting here (0 if none)."""
        return max((r.args[2] for r in self.records() if r.op == "metrics"
                    and r.args[0] == run_id and key in r.args[1]), default=0)

    # ------------------------------------------------------------------ sending
    def send(self, apply: Callable[[str, list], None], keep: Callable[[Exception], bool],
             own: bool = False) -> int:
        """Send the records (only this process's with `own`) through `apply(op, args)` in
        order, deleting each once sent; returns how many. An error `keep` says is worth
        waiting for (the server went again) stops here and leaves the rest for the next send;
        a record the server refuses for good is dropped with a warning, as the call itself
        would have failed."""
        if own and self._writer is None:
            return 0   # this process wrote nothing
        sent = 0
        for record in self.records(self._writer if own else None):
            try:
                apply(record.op, record.args)
                sent += 1
            except Exception as e:
                if keep(e):
                    raise
                warnings.warn(f"tracking journal: the server refused {record.op} of "
                              f"{record.path}: {str(e).splitlines()[0] if str(e) else e}",
                              stacklevel=2)
            fs, inner = storage.resolve(record.path)
            try:
                fs.delete_file(inner)
            except FileNotFoundError:
                pass
        return sent


def artifact_file(args: list, folder: str) -> tuple[str, str, str | None]:
    """(run_id, local file, artifact_path) of an `artifact_bytes` record, the file written
    into `folder` after checking its digest."""
    run_id, data, digest, name, artifact_path = args
    raw = base64.b64decode(data)
    if hashlib.sha256(raw).hexdigest() != digest:
        raise ValueError(f"tracking journal: the bytes of {name} do not match their digest")
    path = Path(folder) / name
    path.write_bytes(raw)
    return run_id, str(path), artifact_path
