"""DataLoader subclasses: report dropped samples from the main process, resume mid-epoch
(map-style), and carry the epoch into streaming datasets."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

from torch.utils.data import DataLoader, Dataset, Sampler

from .sampler import EpochShardSampler
from .samples import SKIPPED_FIELD

logger = logging.getLogger(__name__)


class SkipReport:
    """Main-process tally of dropped samples: ``keys`` maps key -> reason, each logged once."""

    def __init__(self) -> None:
        self.keys: dict[str, str] = {}
        self.total = 0  # every drop, including the same key again in a later epoch

    def consume(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Log and record the batch's dropped samples; return the batch without the private field."""
        for key, reason in batch.pop(SKIPPED_FIELD, ()):
            self.total += 1
            if key not in self.keys:
                self.keys[key] = reason
                logger.warning("Skipped undecodable image %r: %s", key, reason)
        return batch


class ReportingDataLoader(DataLoader):
    """A DataLoader whose batches pass through a :class:`SkipReport` before the trainer sees them."""

    def __init__(
        self, dataset: Dataset, *args: Any, skip_report: SkipReport | None = None, **kwargs: Any
    ) -> None:
        super().__init__(dataset, *args, **kwargs)
        self.skip_report = skip_report if skip_report is not None else SkipReport()

    def __iter__(self) -> Iterator[dict[str, Any]]:
        # A generator, so nothing (epoch, offsets) is read until the first batch is requested;
        # Lightning calls iter() before set_epoch() on resume.
        for batch in super().__iter__():
            yield self.skip_report.consume(batch)


class ResumableDataLoader(ReportingDataLoader):
    """Map-style training loader that can stop mid-epoch and continue at the next unseen sample.

    State is ``{"epoch", "samples_yielded"}`` where ``samples_yielded`` counts this rank's
    sampler positions already handed to the trainer (kept and dropped samples alike). It is
    counted here, in the main process, because workers prefetch ahead of the trainer.
    Lightning saves it through the ``state_dict``/``load_state_dict`` protocol.

    After a full pass the sampler's epoch is advanced, so plain ``for`` loops also reshuffle;
    Lightning's own ``set_epoch`` calls agree with that.

    With another sampler (Lightning swaps in a ``SequentialSampler`` for ``overfit_batches``)
    it is a plain loader with an empty state.
    """

    def __init__(self, dataset: Dataset, sampler: Sampler, **kwargs: Any) -> None:
        super().__init__(dataset, sampler=sampler, **kwargs)
        self.resumable = isinstance(sampler, EpochShardSampler)
        self._iter_epoch = getattr(sampler, "epoch", 0)
        self._yielded = 0
        self._resume: tuple[int, int] | None = None  # (epoch, samples_yielded) from load_state_dict

    def __iter__(self) -> Iterator[dict[str, Any]]:
        if not self.resumable:
            yield from super().__iter__()
            return
        epoch = self.sampler.epoch
        offset = self._resume[1] if self._resume is not None and self._resume[0] == epoch else 0
        self._resume = None
        self.sampler.start_index = offset
        self._iter_epoch, self._yielded = epoch, offset
        for batch in super().__iter__():
            self._yielded += len(batch["key"]) + int(batch["num_skipped"])
            yield batch
        self.sampler.set_epoch(epoch + 1)

    def state_dict(self) -> dict[str, int]:
        if not self.resumable:
            return {}
        epoch = self.sampler.epoch
        if self._resume is not None and self._resume[0] == epoch:
            done = self._resume[1]  # loaded but not iterated yet
        elif self._iter_epoch == epoch:
            done = self._yielded
        else:
            done = 0  # the epoch moved on since the last iteration
        return {
            "epoch": epoch,
            "samples_yielded": done,
            "seed": self.sampler.seed,
            "world_size": self.sampler.num_replicas,
            "dataset_size": self.sampler.dataset_size,
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        if not self.resumable:
            if state:
                logger.warning("Ignoring loader state %s: this loader's sampler is not resumable", state)
            return
        missing = {"epoch", "samples_yielded"} - set(state)
        if missing:
            raise KeyError(f"loader state is missing {sorted(missing)}; got keys {sorted(state)}")
        epoch, done = int(state["epoch"]), int(state["samples_yielded"])
        changed = [
            f"{name}={current} (checkpoint: {state[name]})"
            for name, current in (
                ("seed", self.sampler.seed),
                ("world_size", self.sampler.num_replicas),
                ("dataset_size", self.sampler.dataset_size),
            )
            if name in state and int(state[name]) != current
        ]
        if changed:
            # Resuming on another number of GPUs (or data) must still work, just not exactly.
            logger.warning(
                "Resuming the data loader with %s: the sample order will not continue exactly where it stopped.",
                ", ".join(changed),
            )
            done = min(max(done, 0), len(self.sampler))
        elif not 0 <= done <= len(self.sampler):
            raise ValueError(
                f"loader state samples_yielded={done} is outside [0, {len(self.sampler)}] for this rank"
            )
        self.sampler.set_epoch(epoch)
        self._resume = (epoch, done)


class StreamDataLoader(ReportingDataLoader):
    """Loader for streaming (iterable) datasets that tells the dataset which epoch it is.

    The epoch comes from ``epoch_fn`` (the trainer's current epoch) when it returns a value,
    otherwise from an internal counter that advances on every pass. Mid-epoch resume is not
    exact for streams, so this loader deliberately has no ``state_dict``.
    """

    def __init__(
        self, dataset: Dataset, *args: Any, epoch_fn: Callable[[], int | None] | None = None, **kwargs: Any
    ):
        super().__init__(dataset, *args, **kwargs)
        self._epoch_fn = epoch_fn
        self._next_epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self._next_epoch = int(epoch)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        epoch = self._epoch_fn() if self._epoch_fn is not None else None
        epoch = self._next_epoch if epoch is None else int(epoch)
        self.dataset.set_epoch(epoch)
        self._next_epoch = epoch + 1
        yield from super().__iter__()
