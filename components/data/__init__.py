"""Data steps: ingest (index images), validate (skip bad files), split (stratified), Dataset."""

from components.data.builtin import write_digits_folder
from components.data.dataset import ImageDataset, load_image
from components.data.ingest import (
    IMAGE_EXTENSIONS,
    ImageIndex,
    index_csv_manifest,
    index_image_folder,
    index_images,
)
from components.data.split import SplitManifest, split_dataset
from components.data.validate import DataError, ValidatedImages, validate_images

__all__ = [
    "IMAGE_EXTENSIONS", "DataError", "ImageDataset", "ImageIndex", "SplitManifest",
    "ValidatedImages", "index_csv_manifest", "index_image_folder", "index_images", "load_image",
    "split_dataset", "validate_images",
    "write_digits_folder",
]
