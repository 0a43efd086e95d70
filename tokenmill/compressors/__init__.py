"""Visual-token compressors for VLMs and the VLM assembly that trains them (see base.py)."""

from tokenmill.compressors.base import Compressor, CompressorOutput, IdentityCompressor, VisionFeatures
from tokenmill.compressors.baselines import AveragePooling, ClsAttentionTopK, DivPrune
from tokenmill.compressors.language import CausalLanguageModel
from tokenmill.compressors.m3 import MatryoshkaPooling
from tokenmill.compressors.mqt import MatryoshkaQueryTransformer
from tokenmill.compressors.projector import LinearProjector, MLPProjector
from tokenmill.compressors.registers import RegisterReadout
from tokenmill.compressors.tokenpacker import TokenPacker
from tokenmill.compressors.vision import HFVisionEncoder, TokenizerVisionEncoder
from tokenmill.compressors.vlm import VisionLanguageModel, VisualConnector
from tokenmill.compressors.voco import VoCo

__all__ = [
    "AveragePooling", "CausalLanguageModel", "ClsAttentionTopK", "Compressor", "CompressorOutput",
    "DivPrune", "HFVisionEncoder", "IdentityCompressor", "LinearProjector", "MLPProjector",
    "MatryoshkaPooling", "MatryoshkaQueryTransformer", "RegisterReadout", "TokenPacker", "TokenizerVisionEncoder", "VisionFeatures",
    "VisionLanguageModel", "VisualConnector", "VoCo",
]
