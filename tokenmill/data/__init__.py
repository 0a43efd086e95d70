"""Data pipelines: image sources (embedded photos, image folders, WebDataset shards, Hugging Face
datasets) feeding one :class:`ImageDataModule`, and image-conversation sources (synthetic visual
questions, LLaVA JSON) feeding :class:`VQADataModule` for the VLM stage."""

from .datamodule import ImageDataModule
from .decode import ImageDecodeError, decode_image
from .llava import LLaVAJsonSource
from .loaders import ReportingDataLoader, ResumableDataLoader, SkipReport, StreamDataLoader
from .sampler import EpochShardSampler
from .source_base import MapImageSource, StreamImageSource
from .source_embedded import EmbeddedSource
from .source_hf import HFSource
from .source_imagefolder import ImageFolderSource
from .source_webdataset import ShardStreamDataset, WebDatasetSource
from .text import ConversationTemplate, load_tokenizer, word_tokenizer
from .transforms import EvalTransform, TrainTransform
from .vqa import SyntheticVQA, synthetic_vqa_tokenizer
from .vqa_datamodule import VQADataModule

__all__ = [
    "ConversationTemplate",
    "LLaVAJsonSource",
    "SyntheticVQA",
    "VQADataModule",
    "load_tokenizer",
    "synthetic_vqa_tokenizer",
    "word_tokenizer",
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
