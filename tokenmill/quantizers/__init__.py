from tokenmill.quantizers.base import Quantizer, QuantizerOutput, histogram_metrics
from tokenmill.quantizers.vq import VectorQuantizer

__all__ = ["Quantizer", "QuantizerOutput", "VectorQuantizer", "histogram_metrics"]
