"""Data steps: ingest (index images), validate (skip bad files), split (stratified), Dataset.

Names are imported on first use: a Train worker needs only `components.data.dataset`, and
the split's scikit-learn import would cost each worker about 1 s of its start-up."""

from components.lazy import lazy_names

_WHERE = {
    "write_digits_folder": "builtin",
    "ImageDataset": "dataset", "load_image": "dataset",
    "IMAGE_EXTENSIONS": "ingest", "ImageIndex": "ingest", "index_csv_manifest": "ingest",
    "index_image_folder": "ingest", "index_images": "ingest",
    "SplitManifest": "split", "split_dataset": "split",
    "DataError": "validate", "ValidatedImages": "validate", "validate_images": "validate",
}

__getattr__, __dir__, __all__ = lazy_names(__name__, _WHERE)
