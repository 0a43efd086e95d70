"""Residual quantization (SoundStream, Zeghidour et al. 2021, Algorithm 1) and residual FSQ.

Stage i quantizes what stages < i left unexplained; the output codes are the sum of the stage
codes and the indices are stacked to [B, N, num_quantizers].
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from tokenmill.quantizers.base import Quantizer, QuantizerOutput
from tokenmill.quantizers.distributed import broadcast_
from tokenmill.quantizers.fsq import FSQ
from tokenmill.quantizers.vq import VectorQuantizer

# Index of a stage that did not run (quantizer dropout or `num_stages`); decodes to a zero code.
DROPPED_INDEX = -1


def _reinitialise(module: nn.Module) -> None:
    """Give a deep-copied stage fresh parameters, drawn the way its constructor draws them."""
    reset = getattr(module, "reset_parameters", None)
    if callable(reset):
        reset()
        return
    for child in module.children():
        _reinitialise(child)


class ResidualQuantizer(Quantizer):
    """Residual stack of quantizers with SoundStream-style quantizer dropout.

    Stages, in one of three forms (exactly one):
      stage: a Quantizer module, deep-copied `num_quantizers` times; each copy is re-initialised
          (`reset_parameters()` where a module defines it, as VectorQuantizer does, else its
          children recursively), so the stages
          share no parameters and do not start identical. This is what Hydra hands over for
          `stage: {_target_: ...}` (nested configs are instantiated first).
      stage: a callable returning a fresh Quantizer (e.g. Hydra `_partial_: true`), called
          `num_quantizers` times.
      quantizers: a list of ready Quantizer modules, used as they are.

    All stages must share `dim` and `codebook_size`; `codebook_size` is the per-stage size (an
    index in [B, N, q] lies in [0, codebook_size) or is -1 for a stage that did not run).
    VectorQuantizer stages must be Euclidean (use_l2_norm=False): with cosine VQ the stage inputs
    and codes are re-normalised, so residuals do not add back up to the latent.

    losses: summed over the stages that ran, per name (e.g. "commitment" = sum of the stage
        commitment losses), so the keys match a single quantizer's.
    metrics: "active_stages", and every stage metric prefixed "stage{i}/" (e.g. "stage0/usage").

    quantizer_dropout: probability, per training forward, of running only the first q stages,
        q uniform in 1..num_quantizers (SoundStream). Later stages get index -1 and contribute
        nothing. Never applied in eval mode. The draws come from a private torch.Generator seeded
        with `dropout_seed` when one is given (its state is not checkpointed), else from the
        global torch RNG; under torch.distributed rank 0's draw is broadcast, so all ranks agree.

    `forward(z, num_stages=k)` runs only the first k stages (in training too; it overrides the
    dropout draw), for coarse-to-fine decoding.
    """

    def __init__(
        self,
        stage: Quantizer | Callable[[], Quantizer] | None = None,
        num_quantizers: int | None = None,
        *,
        quantizers: Sequence[Quantizer] | None = None,
        quantizer_dropout: float = 0.0,
        dropout_seed: int | None = None,
    ):
        super().__init__()
        if (stage is None) == (quantizers is None):
            raise ValueError(
                "ResidualQuantizer needs exactly one of `stage` (with num_quantizers) or `quantizers`"
            )
        if quantizers is not None:
            stages = list(quantizers)
            if num_quantizers is not None and num_quantizers != len(stages):
                raise ValueError(f"num_quantizers={num_quantizers} but {len(stages)} quantizers were given")
        else:
            if not isinstance(num_quantizers, int) or isinstance(num_quantizers, bool) or num_quantizers < 1:
                raise ValueError(f"num_quantizers must be an int >= 1, got {num_quantizers!r}")
            if isinstance(stage, nn.Module):
                stages = []
                for i in range(num_quantizers):
                    copied = copy.deepcopy(stage)
                    if i > 0:  # stage 0 keeps the given module's parameters
                        _reinitialise(copied)
                    stages.append(copied)
            elif callable(stage):
                stages = [stage() for _ in range(num_quantizers)]
            else:
                raise ValueError(
                    f"`stage` must be a Quantizer module or a factory returning one, got {type(stage)}"
                )
        if not stages:
            raise ValueError("ResidualQuantizer needs at least one stage")
        for i, q in enumerate(stages):
            if not isinstance(q, Quantizer):
                raise ValueError(f"stage {i} is {type(q).__name__}, not a Quantizer")
            if isinstance(q, VectorQuantizer) and q.use_l2_norm:
                raise ValueError(
                    f"stage {i} is a VectorQuantizer with use_l2_norm=True; residual VQ needs Euclidean stages "
                    "(use_l2_norm=False): cosine-normalised residuals do not sum back to the latent"
                )
            if q.dim != stages[0].dim:
                raise ValueError(f"stage dims differ: stage 0 has dim {stages[0].dim}, stage {i} has {q.dim}")
            if q.codebook_size != stages[0].codebook_size:
                raise ValueError(
                    f"stage codebook sizes differ: stage 0 has {stages[0].codebook_size}, stage {i} has "
                    f"{q.codebook_size}"
                )
        if not 0.0 <= quantizer_dropout <= 1.0:
            raise ValueError(f"quantizer_dropout must be in [0, 1], got {quantizer_dropout}")

        self.stages = nn.ModuleList(stages)
        self.num_quantizers = len(stages)
        self.dim = stages[0].dim
        self.codebook_size = stages[0].codebook_size
        self.quantizer_dropout = float(quantizer_dropout)
        self.dropout_seed = dropout_seed
        self._generator: torch.Generator | None = None
        if dropout_seed is not None:
            self._generator = torch.Generator().manual_seed(int(dropout_seed))

    # Hooks for subclasses (ResidualFSQ): input/output transforms and per-stage scales.
    def prepare_input(self, z: Tensor) -> Tensor:
        return z

    def finish_output(self, codes: Tensor) -> Tensor:
        return codes

    def stage_scale(self, i: int) -> Tensor | None:
        """Stage i quantizes residual / scale and contributes its codes * scale (None: no scaling)."""
        return None

    @property
    def bits_per_token(self) -> float:
        return sum(stage.bits_per_token for stage in self.stages)

    def sample_num_stages(self) -> int:
        """Stages to run in this training step under quantizer dropout (drawn on the CPU)."""
        if self.quantizer_dropout <= 0.0 or self.num_quantizers == 1:
            return self.num_quantizers
        gen = self._generator
        if torch.rand((), generator=gen).item() >= self.quantizer_dropout:
            return self.num_quantizers
        return int(torch.randint(1, self.num_quantizers + 1, (), generator=gen).item())

    def forward(self, z: Tensor, num_stages: int | None = None) -> QuantizerOutput:
        if z.dim() != 3 or z.shape[-1] != self.dim:
            raise ValueError(
                f"{type(self).__name__} expects latents [B, N, {self.dim}], got {tuple(z.shape)}"
            )
        input_dtype = z.dtype
        with torch.autocast(device_type=z.device.type, enabled=False):
            out = self.quantize(z.float(), num_stages=num_stages)
        return out._replace(codes=out.codes.to(input_dtype))

    def quantize(self, z: Tensor, num_stages: int | None = None) -> QuantizerOutput:
        if num_stages is not None:
            if not 1 <= num_stages <= self.num_quantizers:
                raise ValueError(f"num_stages must be in 1..{self.num_quantizers}, got {num_stages}")
            active = num_stages
        elif self.training and self.quantizer_dropout > 0:
            # Rank 0's draw wins: stages may hold collectives (EMA / re-seeded VQ), so every rank
            # must run the same number of them.
            active = int(broadcast_(torch.tensor(self.sample_num_stages(), device=z.device)))
        else:
            active = self.num_quantizers

        residual = self.prepare_input(z)
        total: Tensor | None = None
        all_indices: list[Tensor] = []
        losses: dict[str, Tensor] = {}
        metrics: dict[str, Tensor] = {"active_stages": torch.tensor(float(active))}
        for i in range(active):
            scale = self.stage_scale(i)
            stage_in = residual if scale is None else residual / scale
            out = self.stages[i](stage_in)
            stage_codes = out.codes if scale is None else out.codes * scale
            residual = residual - stage_codes.detach()
            total = stage_codes if total is None else total + stage_codes
            all_indices.append(out.indices)
            for name, value in out.losses.items():
                losses[name] = losses[name] + value if name in losses else value
            for name, value in out.metrics.items():
                metrics[f"stage{i}/{name}"] = value
        dropped = torch.full_like(all_indices[0], DROPPED_INDEX)
        all_indices.extend(dropped for _ in range(active, self.num_quantizers))
        indices = torch.stack(all_indices, dim=-1)
        return QuantizerOutput(self.finish_output(total), indices, losses, metrics)

    def indices_to_codes(self, indices: Tensor) -> Tensor:
        """indices [B, N, q] with q <= num_quantizers (-1 = stage skipped) -> codes [B, N, dim].

        Bitwise equal to forward's codes for the same indices: stage codes are added in the same
        order, and a skipped stage adds an exact zero.
        """
        if indices.dim() < 1 or not 1 <= indices.shape[-1] <= self.num_quantizers:
            raise ValueError(
                f"{type(self).__name__} expects indices [..., q] with 1 <= q <= {self.num_quantizers}, "
                f"got {tuple(indices.shape)}"
            )
        total: Tensor | None = None
        for i in range(indices.shape[-1]):
            stage_indices = indices[..., i]
            skipped = stage_indices == DROPPED_INDEX
            codes = self.stages[i].indices_to_codes(stage_indices.clamp_min(0))
            scale = self.stage_scale(i)
            if scale is not None:
                codes = codes * scale
            codes = codes.masked_fill(skipped.unsqueeze(-1), 0.0)
            total = codes if total is None else total + codes
        return self.finish_output(total)


class ResidualFSQ(ResidualQuantizer):
    """Residual FSQ as in vector-quantize-pytorch's ResidualFSQ (bitwise identical to it).

    Every stage is a symmetric FSQ (preserve_symmetry=True) over `levels`. Stage i quantizes
    residual * levels**i and contributes its codes / levels**i (per channel), so each stage
    refines the previous one's grid step by a factor of L. With hard_clamp=True (the oracle's
    default) the input is first soft-clamped per channel to +-(1 + 1/(L-1)), tanh(x / c) * c, and
    the stages bound with clamp(-1, 1); with hard_clamp=False the stages bound with tanh and the
    input is not clamped.

    dim: latent width; if it differs from len(levels), Linear project_in/project_out (with bias)
    wrap the whole stack, as in the oracle.
    """

    def __init__(
        self,
        levels: list[int],
        num_quantizers: int,
        dim: int | None = None,
        *,
        hard_clamp: bool = True,
        quantizer_dropout: float = 0.0,
        dropout_seed: int | None = None,
    ):
        levels = list(levels) if levels is not None and not isinstance(levels, (str, bytes)) else levels
        stage = FSQ(levels, preserve_symmetry=True, hard_clamp=hard_clamp)
        if not isinstance(num_quantizers, int) or isinstance(num_quantizers, bool) or num_quantizers < 1:
            raise ValueError(f"num_quantizers must be an int >= 1, got {num_quantizers!r}")
        super().__init__(
            quantizers=[copy.deepcopy(stage) for _ in range(num_quantizers)],
            quantizer_dropout=quantizer_dropout,
            dropout_seed=dropout_seed,
        )
        self.levels = stage.levels
        codebook_dim = len(self.levels)
        self.dim = codebook_dim if dim is None else int(dim)
        self.hard_clamp = hard_clamp
        self.has_projections = self.dim != codebook_dim
        if self.has_projections:
            self.project_in: nn.Module = nn.Linear(self.dim, codebook_dim)
            self.project_out: nn.Module = nn.Linear(codebook_dim, self.dim)
        else:
            self.project_in = nn.Identity()
            self.project_out = nn.Identity()
        levels_t = torch.tensor(self.levels)
        self.register_buffer(
            "scales", torch.stack([levels_t.float() ** -i for i in range(num_quantizers)]), persistent=False
        )
        self.register_buffer("clamp_value", 1 + 1 / (levels_t - 1), persistent=False)

    def prepare_input(self, z: Tensor) -> Tensor:
        z = self.project_in(z)
        if self.hard_clamp:
            z = (z / self.clamp_value).tanh() * self.clamp_value
        return z

    def finish_output(self, codes: Tensor) -> Tensor:
        return self.project_out(codes)

    def stage_scale(self, i: int) -> Tensor | None:
        return self.scales[i]
