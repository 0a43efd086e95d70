from tokenmill.tokenizers.autoencoder import Autoencoder, AutoencoderOutput
from tokenmill.tokenizers.conv2d import ConvDecoder2D, ConvEncoder2D
from tokenmill.tokenizers.vit1d import VIT_SIZES, ViTDecoder1D, ViTEncoder1D

__all__ = [
    "VIT_SIZES",
    "Autoencoder",
    "AutoencoderOutput",
    "ConvDecoder2D",
    "ConvEncoder2D",
    "ViTDecoder1D",
    "ViTEncoder1D",
]
