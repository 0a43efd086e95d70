from tokenmill.trainers.callbacks import ReconstructionGrid
from tokenmill.trainers.checkpoint_io import AtomicCheckpointIO
from tokenmill.trainers.ema import EMA
from tokenmill.trainers.tokenizer_task import TokenizerTask
from tokenmill.trainers.vlm_task import VLMTask

__all__ = ["EMA", "AtomicCheckpointIO", "ReconstructionGrid", "TokenizerTask", "VLMTask", "train"]


def train(cfg):
    """Entry point used by train.py (imported lazily so `import tokenmill.trainers` stays light)."""
    from tokenmill.trainers.run import train as _train

    return _train(cfg)
