"""FSDP2 sharding policy for tokenmill tasks (`trainer=fsdp`; see docs/distributed.md).

What `shard_model` does to one model (the generator, its EMA copy, the discriminator, a VLM):

* every transformer block (`block_types` by class name, plus each Hugging Face model's
  `_no_split_modules` classes that sit in an `nn.ModuleList`: LlamaDecoderLayer, CLIPEncoderLayer,
  ...) becomes its own `fully_shard` unit, then the model itself becomes the root unit holding
  everything else (embeddings, heads, norms);
* parameters of `replicated_types` modules (tokenmill `Quantizer`s) stay plain, replicated
  tensors (`ignored_params`): k-means and dead-code re-seeding write the VQ codebook in place,
  which a sharded DTensor cannot take. FSDP does not reduce their gradients, so the tasks call
  `sync_replicated_grads` after backward (an all-reduce mean, what DDP would do);
* frozen parameters (`requires_grad=False`: a frozen LLM or ViT, the EMA copy) are sharded like
  the rest: 1/N of their memory per rank, and, like under DDP, no gradient and no optimizer state;
* bf16 `MixedPrecisionPolicy` (fp32 gradient reduction) when the run computes in bf16 (the
  default on CUDA: `bf16-mixed`; fp32 on CPU), optional activation checkpointing per block (parameter names unchanged, so checkpoints load with it on or off).

`full_state_dict` / `gathered_copy` assemble the full weights on rank 0 for the export, and
`clip_grad_norm_` clips a mix of sharded (DTensor) and replicated gradients. `FSDP2Strategy` is
Lightning's `ModelParallelStrategy` with the policy's options, a data-parallel mesh over every
rank, and sharded checkpoints written to a temporary directory and renamed into place.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import types
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

log = logging.getLogger(__name__)

DEFAULT_BLOCK_TYPES = ("TransformerBlock", "AdaLNZeroBlock")
DEFAULT_REPLICATED_TYPES = ("Quantizer",)


# ------------------------------------------------------------------------------ what is sharded
def _class_names(module: nn.Module) -> set[str]:
    return {cls.__name__ for cls in type(module).__mro__}


def find_blocks(module: nn.Module, block_types: Iterable[str] = DEFAULT_BLOCK_TYPES) -> list[nn.Module]:
    """The modules that become their own FSDP unit, outermost first (a block inside a block is
    not wrapped twice)."""
    names = set(block_types)
    hf_names: set[str] = set()
    for sub in module.modules():
        hf_names |= set(getattr(sub, "_no_split_modules", None) or ())
    repeated = {id(child) for sub in module.modules() if isinstance(sub, nn.ModuleList) for child in sub}
    blocks: list[nn.Module] = []
    inside: set[int] = set()
    for sub in module.modules():  # pre-order: parents before children
        if id(sub) in inside or sub is module:
            continue
        own = type(sub).__name__
        if own in names or (own in hf_names and id(sub) in repeated):
            blocks.append(sub)
            inside |= {id(m) for m in sub.modules()}
    return blocks


def replicated_params(module: nn.Module, replicated_types: Iterable[str] = DEFAULT_REPLICATED_TYPES) -> set[nn.Parameter]:
    wanted = set(replicated_types)
    return {p for sub in module.modules() if _class_names(sub) & wanted for p in sub.parameters()}


def is_sharded(module: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def _checkpointed_forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    # The class's forward, recomputed in backward; FSDP's hooks stay on the block's __call__.
    return torch.utils.checkpoint.checkpoint(type(self).forward, self, *args, use_reentrant=False, **kwargs)


def enable_activation_checkpointing(block: nn.Module) -> None:
    """Recompute `block` in backward instead of keeping its activations. Hugging Face layers use
    their own switch (it also keeps the KV cache out of the recomputation); other blocks get a
    checkpointed `forward`. Parameter names do not change."""
    if "GradientCheckpointingLayer" in _class_names(block):
        block.gradient_checkpointing = True
        block._gradient_checkpointing_func = functools.partial(torch.utils.checkpoint.checkpoint, use_reentrant=False)
    else:
        block.forward = types.MethodType(_checkpointed_forward, block)


def shard_model(
    module: nn.Module,
    mesh,
    *,
    mixed_precision: bool | str = "auto",
    activation_checkpointing: bool = False,
    reshard_after_forward: bool = True,
    block_types: Iterable[str] = DEFAULT_BLOCK_TYPES,
    replicated_types: Iterable[str] = DEFAULT_REPLICATED_TYPES,
    root_reshard_after_forward: bool | None = None,
) -> nn.Module:
    """Apply FSDP2 to `module` in place (see the module docstring). Idempotent.

    mesh: a 1-D data-parallel DeviceMesh. mixed_precision: True, False or "auto" (bf16 on CUDA;
    the tasks resolve "auto" from the trainer's precision, see `sharding_options`).
    root_reshard_after_forward: None keeps FSDP's default for a root (stay unsharded until
    backward); True for a module that never runs backward (the EMA copy).
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if is_sharded(module):
        return module
    if mesh.ndim != 1:
        raise ValueError(f"shard_model needs a 1-D data-parallel mesh, got {mesh.ndim} dimensions")
    if mixed_precision == "auto":
        mixed_precision = mesh.device_type == "cuda"
    kwargs: dict[str, Any] = {"mesh": mesh}
    if mixed_precision:
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    ignored = replicated_params(module, replicated_types)
    blocks = find_blocks(module, block_types)
    for block in blocks:
        block_ignored = {p for p in block.parameters() if p in ignored}
        if activation_checkpointing:
            enable_activation_checkpointing(block)
        fully_shard(block, reshard_after_forward=reshard_after_forward, ignored_params=block_ignored or None, **kwargs)
    fully_shard(module, reshard_after_forward=root_reshard_after_forward, ignored_params=ignored or None, **kwargs)
    log.info(
        "FSDP2: %s sharded as %d blocks + root over %d ranks (%d replicated parameters%s%s)",
        type(module).__name__, len(blocks), mesh.size(), len(ignored),
        ", bf16 params" if mixed_precision else "", ", activation checkpointing" if activation_checkpointing else "",
    )
    return module


def data_parallel_mesh(device_mesh):
    """The 1-D data-parallel mesh of Lightning's ModelParallelStrategy mesh (None: not sharded)."""
    if device_mesh is None:
        return None
    if "tensor_parallel" in (device_mesh.mesh_dim_names or ()):
        if device_mesh["tensor_parallel"].size() != 1:
            raise NotImplementedError("tokenmill shards with FSDP only: set tensor_parallel_size=1")
        return device_mesh["data_parallel"]
    return device_mesh


def sharding_options(strategy: Any) -> dict[str, Any]:
    """The policy options an FSDP2Strategy carries (defaults for a plain ModelParallelStrategy),
    with `mixed_precision: auto` resolved from the trainer's precision: bf16 parameters exactly
    when the run computes in bf16 (`bf16-mixed`, `bf16-true`)."""
    options = dict(getattr(strategy, "sharding_options", {}))
    if options.get("mixed_precision", "auto") == "auto":
        precision = str(getattr(getattr(strategy, "precision_plugin", None), "precision", ""))
        options["mixed_precision"] = precision.startswith("bf16")
    return options


# ------------------------------------------------------------------------- training-time helpers
def local(tensor: Tensor) -> Tensor:
    """This rank's shard of a DTensor (an alias, writes go through), or the tensor itself."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def reshard(module: nn.Module) -> None:
    """Register the sharded parameters again on every FSDP unit of `module` (a root that ran a
    forward without backward keeps its unsharded ones)."""
    from torch.distributed.fsdp import FSDPModule

    for sub in module.modules():
        if isinstance(sub, FSDPModule):
            sub.reshard()


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


@torch.no_grad()
def sync_replicated_grads(parameters: Iterable[Tensor]) -> None:
    """Average over ranks the gradients of the plain (non-DTensor) parameters in `parameters`,
    as DDP would: FSDP leaves the parameters it ignores unreduced. A gradient that exists on some
    ranks only counts as zero on the others; one that exists nowhere stays None."""
    params = [p for p in parameters if p.requires_grad and not isinstance(p, DTensor)]
    if not params or not _distributed():
        return
    device = params[0].device
    present = torch.tensor([float(p.grad is not None) for p in params], device=device)
    dist.all_reduce(present)
    grads = []
    for p, count in zip(params, present.tolist(), strict=True):
        if count == 0:
            continue
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        grads.append(p.grad)
    if not grads:
        return
    flat = torch._utils._flatten_dense_tensors(grads)
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    for grad, synced in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads), strict=True):
        grad.copy_(synced)


@torch.no_grad()
def clip_grad_norm_(parameters: Iterable[Tensor], max_norm: float, eps: float = 1e-6) -> Tensor:
    """`torch.nn.utils.clip_grad_norm_` (L2) for a mix of sharded (DTensor) and replicated
    gradients, which torch's version refuses to combine. The norm is over the full gradients:
    squared sums of the local shards are all-reduced, replicated gradients (equal on every rank)
    are counted once."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.zeros(())
    sharded = [g for g in grads if isinstance(g, DTensor)]
    plain = [g for g in grads if not isinstance(g, DTensor)]
    device = grads[0].device
    total = torch.zeros((), device=device, dtype=torch.float32)
    if sharded:
        meshes = {g.device_mesh for g in sharded}
        if len(meshes) != 1:
            raise ValueError("clip_grad_norm_: gradients sharded over different meshes")
        squares = torch.stack([local(g).float().pow(2).sum() for g in sharded]).sum()
        if meshes.pop().size() > 1:
            dist.all_reduce(squares, group=sharded[0].device_mesh.get_group())
        total += squares
    if plain:
        total += torch.stack([g.float().pow(2).sum() for g in plain]).sum()
    norm = total.sqrt()
    coef = torch.clamp(max_norm / (norm + eps), max=1.0)
    for grad in grads:
        local(grad).mul_(coef.to(grad.dtype))
    return norm


# ------------------------------------------------------------------------------ gathered export
def full_state_dict(module: nn.Module) -> dict[str, Tensor]:
    """The full (unsharded) state dict on CPU. For a sharded module this is a collective (every
    rank must call it) and only rank 0 receives the tensors (an empty dict elsewhere)."""
    if not is_sharded(module):
        return {k: v.detach().cpu() for k, v in module.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    reshard(module)
    return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def gathered_copy(module: nn.Module, prepare: Callable[[nn.Module], Any] | None = None) -> nn.Module | None:
    """An unsharded model with `module`'s full weights, on rank 0; None on the other ranks.

    Sharded: a collective (every rank calls it); rank 0 rebuilds the model from its recorded
    config (`portable_config`, what `from_pretrained` of the export builds), applies `prepare`
    (e.g. LoRA adapters the task added after building), and loads the gathered weights strictly.
    Not sharded: `module` itself on rank 0 (no copy, no collective).
    """
    rank = dist.get_rank() if _distributed() else 0
    if not is_sharded(module):
        return module if rank == 0 else None
    from tokenmill.export.pretrained import _check_state_dict, build_model, model_config, portable_config

    state = full_state_dict(module)
    if rank != 0:
        return None
    twin = build_model(portable_config(module))
    twin._tokenmill_config = model_config(module)
    if prepare is not None:
        prepare(twin)
    _check_state_dict(twin, state, Path(f"<gathered {type(module).__name__}>"))
    twin.load_state_dict(state, strict=False)  # checked above; tied weights may appear once
    return twin.eval()


# --------------------------------------------------------------------------------------- strategy
class FSDP2Strategy(ModelParallelStrategy):
    """Lightning's ModelParallelStrategy for pure FSDP2 with tokenmill's sharding policy.

    * the data-parallel dimension spans every rank (`num_nodes * devices`; Lightning's default
      would make it the node count and give all GPUs of a node the same batches) and tensor
      parallelism is off;
    * the policy options are read by the tasks' `configure_model` (`sharding_options`);
    * a sharded checkpoint is written to `.<name>.tmp-<pid>` next to its target and renamed into
      place once every rank has written its shard, so a crash mid-write never leaves a
      half-written `last.ckpt` directory.
    """

    def __init__(
        self,
        mixed_precision: bool | str = "auto",
        activation_checkpointing: bool = False,
        reshard_after_forward: bool = True,
        block_types: Iterable[str] = DEFAULT_BLOCK_TYPES,
        replicated_types: Iterable[str] = DEFAULT_REPLICATED_TYPES,
        save_distributed_checkpoint: bool = True,
        data_parallel_size: int | str = "auto",
        **kwargs: Any,
    ) -> None:
        super().__init__(
            data_parallel_size=data_parallel_size, tensor_parallel_size=1,
            save_distributed_checkpoint=save_distributed_checkpoint, **kwargs,
        )
        self.sharding_options = {
            "mixed_precision": mixed_precision,
            "activation_checkpointing": bool(activation_checkpointing),
            "reshard_after_forward": bool(reshard_after_forward),
            "block_types": tuple(block_types),
            "replicated_types": tuple(replicated_types),
        }

    def setup_environment(self) -> None:
        if self._data_parallel_size == "auto":
            self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath, storage_options: Any | None = None) -> None:
        if not self._save_distributed_checkpoint:
            return super().save_checkpoint(checkpoint, filepath, storage_options=storage_options)
        path = Path(self.broadcast(str(filepath)))
        tmp = path.with_name(f".{path.name}.tmp-{self.broadcast(os.getpid())}")
        if self.is_global_zero and tmp.exists():
            shutil.rmtree(tmp)
        self.barrier()
        super().save_checkpoint(checkpoint, tmp, storage_options=storage_options)
        self.barrier()  # every shard and meta.pt are written
        if self.is_global_zero:
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            if path.is_dir():
                path.rename(old)
            elif path.exists():
                path.unlink()
            tmp.rename(path)
            shutil.rmtree(old, ignore_errors=True)
        self.barrier()


def model_for_export(live: nn.Module, gathered: nn.Module | None, sharded: bool) -> nn.Module:
    """What a task saves: its live module, or, when sharded, the copy `gathered_copy` made."""
    if not sharded:
        return live
    if gathered is None:
        raise RuntimeError(
            "a sharded (FSDP) model is gathered before it is exported: call task.gather_for_export() "
            "on every rank first (run.py does after the final validation)"
        )
    return gathered
