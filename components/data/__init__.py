"""Data steps: ingest (index images), validate (skip bad files), split (stratified), Dataset.

Names are imported on first use: a Train worker needs only `components.data.dataset`, and
the split's scikit-learn import would cost each worker about 1 s of its start-up."""

from importlib import import_module

_WHERE = {
    "write_digits_folder": "builtin",
    "ImageDataset": "dataset", "load_image": "dataset",
    "IMAGE_EXTENSIONS": "ingest", "ImageIndex": "ingest", "index_csv_manifest": "ingest",
    "index_image_folder": "ingest", "index_images": "ingest",
    "SplitManifest": "split", "split_dataset": "split",
    "DataError": "validate", "ValidatedImages": "validate", "validate_images": "validate",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(f"{__name__}.{_WHERE[name]}"), name)
    globals()[name] = value
    return value


def __dir__():
    return __all__
