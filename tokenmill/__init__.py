"""tokenmill: training framework for learned visual tokenizers and visual-token compressors."""

__version__ = "0.1.0"
