"""Image data pipeline: sources (embedded photos, image folders, WebDataset shards, Hugging Face
datasets) feeding one :class:`ImageDataModule` with a fixed batch contract."""

from .datamodule import ImageDataModule
from .decode import ImageDecodeError, decode_image
from .loaders import ReportingDataLoader, ResumableDataLoader, SkipReport, StreamDataLoader
from .sampler import EpochShardSampler
from .source_base import MapImageSource, StreamImageSource
from .source_embedded import EmbeddedSource
from .source_hf import HFSource
from .source_imagefolder import ImageFolderSource
from .source_webdataset import ShardStreamDataset, WebDatasetSource
from .transforms import EvalTransform, TrainTransform

__all__ = [
    "EmbeddedSource",
    "EpochShardSampler",
    "EvalTransform",
    "HFSource",
    "ImageDataModule",
    "ImageDecodeError",
    "ImageFolderSource",
    "MapImageSource",
    "ReportingDataLoader",
    "ResumableDataLoader",
    "ShardStreamDataset",
    "SkipReport",
    "StreamDataLoader",
    "StreamImageSource",
    "TrainTransform",
    "WebDatasetSource",
    "decode_image",
]
