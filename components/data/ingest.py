"""Index an image folder laid out as root/<class>/<files> (Kaggle Cats vs Dogs layout), local
or in object storage, or a CSV manifest (path,label)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from components import storage
from components.errors import DataError, MissingPathError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


@dataclass(frozen=True)
class ImageIndex:
    root: str
    paths: list[str]       # absolute paths
    labels: list[int]      # index into classes
    classes: list[str]     # sorted class-folder names

    def __len__(self) -> int:
        return len(self.paths)


def _visible(path: Path, root: Path) -> bool:
    return not any(part.startswith(".") for part in path.relative_to(root).parts)


def image_files(root: str | Path) -> list[tuple[str, tuple[str, ...]]]:
    """(file, its path parts below `root`) for every image file under the folder `root` (a
    local path or a URI), hidden files and folders skipped, extensions in any letter case,
    sorted by file. A URI root's files are URIs (with its ?query)."""
    found = []
    if storage.is_uri(root):
        url = str(root).rstrip("/")
        head = url.partition("?")[0]
        for f in storage.list_files(url):
            found.append((f, tuple(f.partition("?")[0][len(head):].strip("/").split("/"))))
    else:
        root = Path(root)
        found = [(str(f), f.relative_to(root).parts) for f in root.rglob("*") if f.is_file()]
    return sorted((f, parts) for f, parts in found
                  if Path(parts[-1]).suffix.lower() in IMAGE_EXTENSIONS
                  and not any(part.startswith(".") for part in parts))


def _index_url_folder(url: str) -> ImageIndex:
    """The same layout in object storage (s3://, gs://, ...) through `components.storage`:
    every node reads the images from there, none travels with the job."""
    url = url.rstrip("/")
    if storage.file_type(url) != "dir":
        raise MissingPathError(f"data.path={url} is not a directory (or not readable)")
    head, query = url.partition("?")[0], "?" + url.partition("?")[2] if "?" in url else ""
    by_class: dict[str, list[str]] = {}
    for f, parts in image_files(url):
        if len(parts) >= 2:   # files at the root belong to no class
            by_class.setdefault(parts[0], []).append(f)
    classes = sorted(by_class)
    paths, labels = [], []
    for label, name in enumerate(classes):
        paths += by_class[name]
        labels += [label] * len(by_class[name])
    return ImageIndex(head + query, paths, labels, classes)


def open_file(path: str):
    """A binary file object for a local path or an object-storage URI."""
    return storage.open_input(path) if storage.is_uri(path) else open(path, "rb")


def index_image_folder(root: str | Path) -> ImageIndex:
    """Every image under root/<class>/ (sub-folders of a class included), sorted for
    reproducibility. Hidden files and folders, files at the root and non-image files are
    ignored; extensions match in any letter case. `root` may be a URI (s3://...)."""
    if storage.is_uri(root):
        return _index_url_folder(str(root))
    root = Path(root).expanduser().resolve()
    if not root.is_dir():
        raise MissingPathError(f"data.path={root} is not a directory")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    paths, labels = [], []
    for label, name in enumerate(classes):
        for f in sorted((root / name).rglob("*")):
            if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS and _visible(f, root):
                paths.append(str(f))
                labels.append(label)
    return ImageIndex(str(root), paths, labels, classes)


def _parent(path: str) -> str:
    """The folder a path or URI is in (a URI keeps its ?query)."""
    if not storage.is_uri(path):
        return str(Path(path).parent)
    head, sep, query = path.partition("?")
    return head.rstrip("/").rsplit("/", 1)[0] + sep + query


def index_csv_manifest(csv_path: str | Path, split: str | None = None) -> ImageIndex:
    """A CSV with columns path,label (any other columns are ignored), local or in object
    storage. Relative paths are relative to the CSV's folder, absolute paths and URIs are kept;
    a missing file is left for validation to skip and count. With `split` (promote: "test"),
    a CSV that has a `split` column (a run's split_manifest.csv) gives only those rows: its
    train rows are images a model trained on."""
    import csv
    import io

    csv_path = str(csv_path)
    if not storage.is_uri(csv_path):
        csv_path = str(Path(csv_path).expanduser().resolve())
    if storage.file_type(csv_path) != "file":
        raise MissingPathError(f"data.path={csv_path} does not exist")
    text = storage.read_bytes(csv_path).decode("utf-8-sig")
    reader = csv.DictReader(io.StringIO(text, newline=""))
    missing = {"path", "label"} - set(reader.fieldnames or [])
    if missing:
        raise DataError(f"{csv_path} needs the columns path,label; missing "
                        f"{', '.join(sorted(missing))} (has {reader.fieldnames})")
    records = list(reader)
    if split is not None and "split" in (reader.fieldnames or []):
        records = [r for r in records if (r.get("split") or "").strip() == split]
        if not records:
            raise DataError(f"{csv_path} has a split column but no '{split}' rows: its other "
                            f"rows are images a model trained or was selected on")
    rows = [(r["path"].strip(), r["label"].strip()) for r in records if r["path"].strip()]
    classes = sorted({label for _, label in rows})
    lookup = {c: i for i, c in enumerate(classes)}
    parent = _parent(csv_path)
    paths = [p if storage.is_uri(p) else storage.join(parent, p) if storage.is_uri(parent)
             else str((Path(parent) / p).resolve()) for p, _ in rows]
    return ImageIndex(parent, paths, [lookup[y] for _, y in rows], classes)


def index_images(path: str | Path, split: str | None = None) -> ImageIndex:
    """`path` is an image folder or a .csv manifest (local or a URI); `split`: only a CSV's
    rows of that split, when it has a split column."""
    is_csv = str(path).partition("?")[0].lower().endswith(".csv")
    return index_csv_manifest(path, split) if is_csv else index_image_folder(path)
