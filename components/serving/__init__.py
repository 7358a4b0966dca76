"""What goes into the registered model besides MLflow's own files: the models-from-code file
(`image_classifier.py`, copied into the model and run when it is loaded), the preprocessing it
loads (`components/imaging.py`, logged as the artifact `preprocessing.py`: the training
pipeline's own image loading), the network
exported with torch.export, an input example, and the pinned requirements of a serving
environment.

This package imports neither mlflow nor torch at import time; `image_classifier` is MLflow's to
import (it calls `mlflow.models.set_model`), or `components.inference.formats`'s.
"""

from __future__ import annotations

import io
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

MODEL_CODE = Path(__file__).resolve().with_name("image_classifier.py")
PREPROCESSING_CODE = Path(__file__).resolve().parents[1] / "imaging.py"  # logged with it...
PREPROCESSING_FILE = "preprocessing.py"   # ... under this name, as every version has it
MODEL_FORMAT = "visiontune-images-v1"   # metadata["model_format"] of a model logged this way
WEIGHTS_FILE = "network.pt2"
# Everything the model file imports; pinned to this environment's versions so that
# `mlflow models serve --env-manager virtualenv|conda` and `build-docker` rebuild it.
_REQUIREMENTS = ("mlflow", "torch", "numpy", "pandas", "pillow")


CODE_TAG = "visiontune.code_sha256"   # model version tag: sha256 of each of its files
# Written by MLflow into the folder a registered version is downloaded to (its name and
# version), so it differs with the URI used: not part of what was registered.
_DOWNLOAD_NOTES = {"registered_model_meta"}


class CodeMismatch(ValueError):
    """A registered model's files differ from those recorded at registration."""


def code_digests(model_dir: str | Path) -> dict[str, str]:
    """{relative path: sha256} of every file of a downloaded model. All of them: MLmodel names
    the loader and the code, the .py files run, and even the network file is code
    (`torch.export.load` falls back to a full `torch.load` of it)."""
    import hashlib

    root = Path(model_dir)
    out = {}
    for f in sorted(root.rglob("*")):
        if f.is_file() and f.relative_to(root).as_posix() not in _DOWNLOAD_NOTES:
            h = hashlib.sha256()
            with f.open("rb") as data:
                for block in iter(lambda: data.read(1 << 20), b""):
                    h.update(block)
            out[f.relative_to(root).as_posix()] = h.hexdigest()
    return out


def format_digests(digests: dict[str, str]) -> str:
    return ";".join(f"{k}={v}" for k, v in sorted(digests.items()))


def verify_code(model_dir: str | Path, recorded: str | None, what: str) -> None:
    """Refuse (CodeMismatch, naming the file) a model whose files are not exactly those
    recorded at registration: a registered model is code that every predict, promote and
    server runs. A version registered before the tag (`recorded` None) is not checked: the
    check guards against a changed artifact store, not against whoever may also rewrite the
    registry's tags."""
    if not recorded:
        return
    expected = dict(item.split("=", 1) for item in recorded.split(";") if "=" in item)
    found = code_digests(model_dir)
    for name in sorted(set(expected) | set(found)):
        if expected.get(name) != found.get(name):
            change = ("is missing" if name not in found else "was added" if name not in expected
                      else "no longer matches its sha256")
            raise CodeMismatch(f"{what}: the model file {name} {change} (recorded at "
                               f"registration in the version tag {CODE_TAG}); refusing to run "
                               f"a model whose files were changed in the artifact store")


def export_network(model, channels: int, image_size: int, path: str | Path) -> Path:
    """Save `model` (an nn.Module returning logits) as a torch.export program: it loads with
    `torch.export.load` alone, without this repository's classes. The batch dimension is
    dynamic (the example batch has 2 images: torch.export specialises a batch of 1)."""
    import torch

    model = model.eval()
    example = torch.zeros(2, channels, image_size, image_size)
    with torch.no_grad():
        program = torch.export.export(model, (example,),
                                      dynamic_shapes=({0: torch.export.Dim.AUTO},))
    path = Path(path)
    torch.export.save(program, str(path))
    return path


def example_image_bytes(channels: int, image_size: int) -> bytes:
    """A PNG file of the size and mode the model was trained on: the logged input example."""
    from PIL import Image

    mode = "L" if channels == 1 else "RGB"
    buf = io.BytesIO()
    Image.new(mode, (image_size, image_size), 128 if mode == "L" else (128, 128, 128)).save(
        buf, format="PNG")
    return buf.getvalue()


def pip_requirements() -> list[str]:
    out = []
    for name in _REQUIREMENTS:
        try:
            # a local build tag (torch's "+cu130") is not installable from an index
            out.append(f"{name}=={version(name).split('+')[0]}")
        except PackageNotFoundError:
            out.append(name)
    return out
