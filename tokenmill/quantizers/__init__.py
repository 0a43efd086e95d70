from tokenmill.quantizers.base import Quantizer, QuantizerOutput, histogram_metrics, quantizer_metrics
from tokenmill.quantizers.fsq import FSQ
from tokenmill.quantizers.lfq import LFQ
from tokenmill.quantizers.residual import ResidualFSQ, ResidualQuantizer
from tokenmill.quantizers.vq import VectorQuantizer

__all__ = [
    "FSQ",
    "LFQ",
    "Quantizer",
    "QuantizerOutput",
    "ResidualFSQ",
    "ResidualQuantizer",
    "VectorQuantizer",
    "histogram_metrics",
    "quantizer_metrics",
]
