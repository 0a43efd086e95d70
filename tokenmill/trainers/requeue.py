"""Save a checkpoint before submitit requeues a job.

Inside a submitit job (hydra/launcher=slurm or submitit_local), SLURM sends SIGUSR2
`signal_delay_s` before the time limit (and on preemption where the cluster is set up to);
submitit's handler then calls the Hydra launcher's `checkpoint`, which resubmits the same job
with the same arguments, requeues it and exits. The rerun lands in the same run directory and
`ckpt_path=auto` resumes from the newest checkpoint there.

Left alone, that loses the steps since the last periodic checkpoint. `SaveBeforeRequeue` sits in
front of submitit's handler: a signal that arrives during a training step is deferred to the end
of that step, where every rank agrees to stop, the trainer writes `last.ckpt` (atomically) and
stops, and `train()` then hands the signal to submitit, which requeues. A signal outside a
training step (setup, validation, export) goes to submitit at once, as without this callback.
"""

from __future__ import annotations

import logging
import signal
from pathlib import Path

import lightning as L

log = logging.getLogger(__name__)


def _submitit_handler(signum: int):
    handler = signal.getsignal(signum)
    owner = getattr(handler, "__self__", None)
    return handler if owner is not None and type(owner).__module__.startswith("submitit") else None


def _requeue_signal() -> int | None:
    try:
        from submitit.core.job_environment import JobEnvironment
    except ImportError:
        return None
    return JobEnvironment._usr_sig()


class SaveBeforeRequeue(L.Callback):
    def __init__(self, signum: int, submitit_handler, fallback_dir: Path):
        self.signum = signum
        self.submitit_handler = submitit_handler
        self.fallback_dir = Path(fallback_dir)
        self.trainer: L.Trainer | None = None
        self.pending: tuple[int, object] | None = None  # (signum, frame) of a deferred signal
        self.requested = False  # set once the checkpoint is written: train() must hand over

    @classmethod
    def if_submitit(cls, fallback_dir: Path) -> SaveBeforeRequeue | None:
        """The callback when this process runs as a submitit job, else None."""
        signum = _requeue_signal()
        handler = _submitit_handler(signum) if signum is not None else None
        return cls(signum, handler, fallback_dir) if handler is not None else None

    # ------------------------------------------------------------------------------- signal
    def _on_signal(self, signum, frame) -> None:
        if self.trainer is not None and self.trainer.training:
            log.warning("requeue signal %s: saving a checkpoint after this training step", signum)
            self.pending = (signum, frame)
        else:
            self.submitit_handler(signum, frame)

    def on_fit_start(self, trainer, pl_module) -> None:
        self.trainer = trainer
        signal.signal(self.signum, self._on_signal)

    def on_fit_end(self, trainer, pl_module) -> None:
        self._restore()

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._restore()

    def _restore(self) -> None:
        self.trainer = None
        if signal.getsignal(self.signum) == self._on_signal:
            signal.signal(self.signum, self.submitit_handler)

    # ------------------------------------------------------------------------------ training
    def on_train_batch_end(self, trainer, *args) -> None:
        # All ranks get the signal, maybe in different steps: stop where any of them has it.
        if not trainer.strategy.reduce_boolean_decision(self.pending is not None, all=False):
            return
        callback = trainer.checkpoint_callback
        dirpath = Path(callback.dirpath) if callback is not None and callback.dirpath else self.fallback_dir
        path = dirpath / "last.ckpt"
        trainer.save_checkpoint(path)
        log.warning("requeue: saved %s at global_step %d; stopping for the requeue", path, trainer.global_step)
        trainer.should_stop = True
        self.requested = True

    def hand_over(self) -> None:
        """Let submitit requeue the job (on rank 0 this exits the process)."""
        signum, frame = self.pending or (self.signum, None)
        self.submitit_handler(signum, frame)
