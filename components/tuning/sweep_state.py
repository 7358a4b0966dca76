"""Tune's saved state of a sweep, kept whole through a full disk.

Tune saves a sweep's state (its trials in `experiment_state-*.json`, its trial generator's in
`basic-variant-state-*.json`) in a local staging folder, then copies those files over the
ones under `ray.storage_path`, in place. A disk that fills during the copy leaves them torn
(empty, or cut mid-way). `Tuner.restore` then fails to read them, says so in ray.log only,
and starts the sweep over from its `param_space`, which it does not keep: a resumed sweep
ran one trial with an empty config (the base parameters, under the first trial's id and
MLflow run) and ended "complete", the rest of its grid never run.

So the sweep's generator keeps a copy of its own (`keep_copy`): each time Tune saves, the
experiment state and the generator's state it just wrote, one consistent pair, go into one
file under the experiment folder, written whole or not at all. Before a resume restores the
sweep, `repair_before_restore` reads back every file Tune restores from; torn ones are moved
aside (`.torn`, kept for a post-mortem) and the last intact copy is put in place: Tune then
continues the sweep as of that save (a trial that went further since continues from its own
checkpoints). A torn state with no intact copy of it refuses the resume (`SweepStateTorn`).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import pickletools
import posixpath
import time
import zipfile

from components import storage
from components.errors import UserError

log = logging.getLogger(__name__)               # the console's lines (pipelines/console.py)
ray_log = logging.getLogger("ray.visiontune")   # ray.log, not the console

COPY_FILE = "visiontune-sweep-state.zip"
TORN_SUFFIX = ".torn"


class SweepStateTorn(UserError):
    """Tune's saved state of a sweep does not read back and no intact copy of it was kept."""


def keep_copy(staging_dir: str, session_str: str, experiment_path: str) -> None:
    """Keep the state files Tune just wrote to `staging_dir` (this session's experiment state
    and search algorithm state) in one file under `experiment_path`, replaced whole: a write
    that fails (a full disk) leaves the previous copy as it was."""
    names = sorted(n for n in os.listdir(staging_dir)
                   if n.endswith((f"-{session_str}.json", f"-{session_str}.pkl"))
                   and not n.startswith((".", "tmp-")))
    if not names:
        return
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as z:
        for name in names:
            z.write(os.path.join(staging_dir, name), name)
    target = storage.join(experiment_path, COPY_FILE)
    fs = path = None
    try:
        fs, path = storage.resolve(target)
        with fs.open_output_stream(path + ".tmp") as f:
            f.write(buffer.getvalue())
        fs.move(path + ".tmp", path)   # a rename: the copy is the old one or the new one
    except Exception as e:   # OSError, ArrowIOError ...: never fail Tune's own save
        with contextlib.suppress(Exception):
            if fs is not None:
                fs.delete_file(path + ".tmp")
        ray_log.warning(f"visiontune: could not keep a copy of the sweep's state at {target} "
                        f"({str(e).splitlines()[0] if str(e) else type(e).__name__}); the "
                        "previous copy stays")


def reads_back(data: bytes) -> bool:
    """A state file Tune can read: JSON (the experiment state) or a whole pickle (the rest,
    whatever their names end with), walked opcode by opcode without running it."""
    if not data:
        return False
    if data[:1] == b"\x80":   # pickle protocol 2 and later
        try:
            for _ in pickletools.genops(data):
                pass
        except Exception:   # ValueError, struct errors ...: a stream cut short
            return False
        return True
    try:
        json.loads(data)
    except ValueError:
        return False
    return True


def state_files(experiment_path: str) -> list[str]:
    """The files Tune restores a sweep from: the .json and .pkl files at the top of its
    experiment folder (what its restore copies to its staging folder)."""
    import pyarrow.fs as pafs

    fs, path = storage.resolve(experiment_path)
    return sorted(i.base_name for i in fs.get_file_info(pafs.FileSelector(path,
                                                                          allow_not_found=True))
                  if i.type == pafs.FileType.File and i.base_name.endswith((".json", ".pkl")))


def torn_files(experiment_path: str) -> list[str]:
    return [n for n in state_files(experiment_path)
            if not reads_back(storage.read_bytes(storage.join(experiment_path, n)))]


def _kept_copy(experiment_path: str) -> tuple[dict[str, bytes], float] | None:
    """The kept copy's files and when it was saved; None when there is none or it does not
    read back whole."""
    target = storage.join(experiment_path, COPY_FILE)
    if storage.file_type(target) != "file":
        return None
    try:
        with zipfile.ZipFile(io.BytesIO(storage.read_bytes(target))) as z:
            files = {i.filename: z.read(i) for i in z.infolist()}
            saved = max(time.mktime((*i.date_time, 0, 0, -1)) for i in z.infolist())
    except (zipfile.BadZipFile, ValueError, OSError):
        return None
    if not files or not all(reads_back(data) for data in files.values()):
        return None
    return files, saved


def repair_before_restore(experiment_path: str) -> bool:
    """Before `Tuner.restore`: False when every state file reads back; else the torn ones are
    moved aside, the kept copy is put in place and a console line says so (True). Raises
    `SweepStateTorn` when the copy cannot replace every torn file. Either way, a checkpoint
    the state names and Tune deleted since is put back (`put_back_deleted_checkpoints`)."""
    torn = _repair_torn(experiment_path)
    put_back_deleted_checkpoints(experiment_path)
    return torn


def put_back_deleted_checkpoints(experiment_path: str) -> list[str]:
    """Tune keeps one checkpoint per trial (`num_to_keep=1`) and deletes the one before as
    soon as a trial reports the next, but saves its state of the sweep only every few
    seconds (and a torn state is replaced by an older copy): a driver killed in between
    leaves a state naming a deleted checkpoint, and Tune then fails that trial at every
    restore ("does not exist on storage anymore"; seen in CI after a SIGKILL of the driver).
    Each such checkpoint is put back as a copy of its trial's newest intact one (a trial
    whose last epoch is in it reports once more and ends). Returns the ones put back."""
    import pyarrow.fs as pafs
    from ray import tune

    from components.training.checkpoint import newest_intact

    if not state_files(experiment_path):
        return []
    fs_exp, exp = storage.resolve(experiment_path)
    try:
        grid = tune.ResultGrid(tune.ExperimentAnalysis(exp, storage_filesystem=fs_exp))
        named = [grid[i].checkpoint for i in range(len(grid))]
    except Exception as e:   # Tune's restore reads it again and says what is wrong
        ray_log.warning(f"visiontune: the sweep's checkpoints were not checked: {e}")
        return []
    put_back = []
    for checkpoint in named:
        if checkpoint is None or checkpoint.filesystem.get_file_info(checkpoint.path).type \
                != pafs.FileType.NotFound:
            continue
        newest = newest_intact(storage.uri_in(experiment_path,
                                              posixpath.dirname(checkpoint.path)))
        if newest is None:
            continue   # nothing to continue from: Tune's own error stands
        fs, src = storage.resolve(newest)
        fs.create_dir(checkpoint.path, recursive=True)
        pafs.copy_files(src, checkpoint.path, source_filesystem=fs,
                        destination_filesystem=fs)
        put_back.append(checkpoint.path)
        log.info(f"  {posixpath.basename(checkpoint.path)} of "
                 f"{posixpath.basename(posixpath.dirname(checkpoint.path))} was deleted after "
                 f"Tune last saved the sweep (its driver killed mid-sweep?): put back as a "
                 f"copy of {posixpath.basename(newest)}")
    return put_back


def _repair_torn(experiment_path: str) -> bool:
    torn = torn_files(experiment_path)
    if not torn:
        return False
    kept = _kept_copy(experiment_path)
    unfixable = [n for n in torn if kept is None or n not in kept[0]]
    if unfixable:
        raise SweepStateTorn(
            f"Tune's saved state of the sweep under {experiment_path} is torn "
            f"({', '.join(unfixable)} {'does' if len(unfixable) == 1 else 'do'} not read "
            f"back: a full disk while it was saved?) "
            f"and no intact copy of it was kept: the sweep cannot continue as planned; "
            f"nothing was registered and the run's trials so far stay in its record; start "
            f"the sweep over as a new run (visiontune run with the same config)")
    files, saved = kept
    for name in torn:
        fs, path = storage.resolve(storage.join(experiment_path, name))
        fs.move(path, path + TORN_SUFFIX)
    for name, data in files.items():
        fs, path = storage.resolve(storage.join(experiment_path, name))
        with fs.open_output_stream(path) as f:
            f.write(data)
    log.info(f"  Tune's saved state of the sweep was torn ({', '.join(torn)}: a full disk "
             f"while it was saved?); continuing from its last intact copy, saved at "
             f"{time.strftime('%H:%M:%S', time.localtime(saved))} (the torn files are kept "
             f"as *{TORN_SUFFIX})")
    return True
