from tokenmill.tokenizers.autoencoder import Autoencoder, AutoencoderOutput
from tokenmill.tokenizers.vit1d import VIT_SIZES, ViTDecoder1D, ViTEncoder1D

__all__ = ["VIT_SIZES", "Autoencoder", "AutoencoderOutput", "ViTDecoder1D", "ViTEncoder1D"]
