from tokenmill.tokenizers.autoencoder import Autoencoder, AutoencoderOutput, GenerativeDecoder
from tokenmill.tokenizers.conv2d import ConvDecoder2D, ConvEncoder2D
from tokenmill.tokenizers.flow import RectifiedFlowDecoder
from tokenmill.tokenizers.teachers import REPAAlignment, ViTFeatureTeacher
from tokenmill.tokenizers.vae import FrozenVAE, GaussianBottleneck
from tokenmill.tokenizers.vit1d import VIT_SIZES, ViTDecoder1D, ViTEncoder1D

__all__ = [
    "VIT_SIZES",
    "Autoencoder",
    "AutoencoderOutput",
    "ConvDecoder2D",
    "ConvEncoder2D",
    "FrozenVAE",
    "GaussianBottleneck",
    "GenerativeDecoder",
    "REPAAlignment",
    "RectifiedFlowDecoder",
    "ViTFeatureTeacher",
    "ViTDecoder1D",
    "ViTEncoder1D",
]
