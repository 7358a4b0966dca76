"""Data steps: ingest (index images), validate (skip bad files), copies (group copies and
near-copies), split (by group, stable as data grows), Dataset.

Names are imported on first use: a Train worker needs only `components.data.dataset`, not
what validating and splitting import."""

from components.lazy import lazy_names

_WHERE = {
    "write_digits_folder": "builtin",
    "group_copies": "copies", "near_copy_index": "copies",
    "ImageDataset": "dataset", "load_image": "dataset",
    "IMAGE_EXTENSIONS": "ingest", "ImageIndex": "ingest", "index_csv_manifest": "ingest",
    "index_image_folder": "ingest", "index_images": "ingest",
    "SplitManifest": "split", "drop_near_copies_of_test": "split", "split_dataset": "split",
    "DataError": "validate", "ValidatedImages": "validate", "image_signatures": "validate",
    "validate_images": "validate",
}

__getattr__, __dir__, __all__ = lazy_names(__name__, _WHERE)
