"""Checkpoint writes that never leave a half-written file under the final name."""

from __future__ import annotations

import io
import os
import time
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

# Tests only: seconds to pause after writing the first half of each checkpoint, so that a kill
# can be aimed at the middle of a write (tests/test_resume.py). Unset in normal use.
WRITE_PAUSE_ENV = "TOKENMILL_TEST_CKPT_WRITE_PAUSE_S"


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes to a temporary file in the same directory, fsyncs, then renames over the target:
    a crash or SIGKILL mid-write leaves the previous checkpoint intact. The temporary name starts
    with a dot and contains ".tmp", so `ckpt_path=auto` never picks a leftover one."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        pause = float(os.environ.get(WRITE_PAUSE_ENV, 0) or 0)
        with open(tmp, "wb") as f:
            if pause:
                buffer = io.BytesIO()
                torch.save(checkpoint, buffer)
                data = buffer.getvalue()
                f.write(data[: len(data) // 2])
                f.flush()
                time.sleep(pause)
                f.write(data[len(data) // 2 :])
            else:
                torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    def load_checkpoint(self, path, map_location=None, weights_only: bool | None = None) -> dict[str, Any]:
        # Training checkpoints hold optimizer/loop state (plain containers and tensors);
        # weights_only keeps loading safe for checkpoints copied from elsewhere.
        return super().load_checkpoint(path, map_location=map_location, weights_only=True)
