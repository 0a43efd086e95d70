"""Quantizer state stays identical across ranks and no path hangs (2 CPU processes, gloo).

Each rank sees different latents, as under DDP. The tests check that ranks end bitwise equal,
that the result really pooled both ranks' data (it differs from a rank-0-only run), and that an
evaluation forward on one rank alone calls no collective (run_ranks fails on a hang).
"""

from __future__ import annotations

import pytest
import torch

from tokenmill.quantizers import LFQ, ResidualQuantizer, VectorQuantizer

from .distributed import run_ranks

pytestmark = pytest.mark.distributed

VQ_VARIANTS = {
    "reseed": dict(dim=4, codebook_size=32, use_l2_norm=False, dead_code_patience=2),
    "ema_kmeans_reseed": dict(
        dim=4, codebook_size=32, use_l2_norm=False, ema_decay=0.9, kmeans_init=True, dead_code_patience=2
    ),
    "cosine_ema_kmeans_projected": dict(
        dim=8, codebook_size=16, codebook_dim=4, use_l2_norm=True, ema_decay=0.8, kmeans_init=True,
        dead_code_patience=3,
    ),
}
STEPS = 6


def _rank_latents(rank: int, step: int, dim: int) -> torch.Tensor:
    data = torch.Generator().manual_seed(1000 * rank + step)
    return torch.randn(2, 8, dim, generator=data) + 3.0 * rank


def _train_vq(variant: str, rank: int) -> tuple[VectorQuantizer, int]:
    torch.manual_seed(0)  # same initial codebook on every rank, as DDP guarantees
    vq = VectorQuantizer(**VQ_VARIANTS[variant]).train()
    torch.manual_seed(rank)  # but different random streams afterwards
    reseeded = 0
    for step in range(STEPS):
        out = vq(_rank_latents(rank, step, vq.dim))
        reseeded += int(out.metrics["reseeded_codes"])
    return vq, reseeded


def _vq_worker(rank: int, world_size: int, out_dir: str, variant: str) -> None:
    vq, reseeded = _train_vq(variant, rank)
    if rank == 0:
        # A validation-only forward on one rank must not enter any collective.
        with torch.no_grad():
            vq.eval()(torch.randn(1, 4, vq.dim))
    torch.save({"state": vq.state_dict(), "reseeded": reseeded}, f"{out_dir}/rank{rank}.pt")


@pytest.mark.parametrize("variant", sorted(VQ_VARIANTS))
def test_vq_codebook_updates_keep_ranks_bitwise_identical(tmp_path, variant):
    run_ranks(_vq_worker, tmp_path, str(tmp_path), variant)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["reseeded"] > 0  # the re-seeding actually ran
    assert r0["state"].keys() == r1["state"].keys()
    for key in r0["state"]:
        assert torch.equal(r0["state"][key], r1["state"][key]), key
    alone, _ = _train_vq(variant, rank=0)  # the same loop without a process group
    codebook_key = "ema_codebook" if "ema_decay" in VQ_VARIANTS[variant] else "embedding.weight"
    assert not torch.allclose(alone.state_dict()[codebook_key], r0["state"][codebook_key])
    if "kmeans_init" in VQ_VARIANTS[variant]:
        assert bool(r0["state"]["kmeans_done"])


class _EncoderAndVQ(torch.nn.Module):
    def __init__(self, **vq_kwargs):
        super().__init__()
        self.encoder = torch.nn.Linear(4, 4)
        self.vq = VectorQuantizer(**vq_kwargs)

    def forward(self, x: torch.Tensor):
        return self.vq(self.encoder(x))


def _ddp_worker(rank: int, world_size: int, out_dir: str) -> None:
    from torch.nn.parallel import DistributedDataParallel

    torch.manual_seed(0)
    model = _EncoderAndVQ(
        dim=4, codebook_size=32, use_l2_norm=False, ema_decay=0.9, kmeans_init=True, dead_code_patience=2
    )
    # broadcast_buffers=False: the codebook must stay in sync by itself, not by DDP copying rank 0's.
    ddp = DistributedDataParallel(model, broadcast_buffers=False)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.1)
    torch.manual_seed(rank)
    reseeded = 0
    for step in range(STEPS):
        out = ddp(_rank_latents(rank, step, 4))
        loss = out.codes.pow(2).mean() + sum(out.losses.values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        reseeded += int(out.metrics["reseeded_codes"])
        if rank == 0 and step == 2:  # validation on one rank only, mid-training
            with torch.no_grad():
                model.eval()(torch.randn(1, 4, 4))
            model.train()
    torch.save({"state": model.state_dict(), "reseeded": reseeded}, f"{out_dir}/rank{rank}.pt")


def test_vq_inside_ddp_training_keeps_ranks_bitwise_identical(tmp_path):
    run_ranks(_ddp_worker, tmp_path, str(tmp_path))
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["reseeded"] > 0 and bool(r0["state"]["vq.kmeans_done"])
    for key in r0["state"]:
        assert torch.equal(r0["state"][key], r1["state"][key]), key


def _residual_worker(rank: int, world_size: int, out_dir: str) -> None:
    torch.manual_seed(0)
    stage = VectorQuantizer(dim=4, codebook_size=16, use_l2_norm=False, ema_decay=0.9, dead_code_patience=2)
    rq = ResidualQuantizer(stage, num_quantizers=3, quantizer_dropout=0.7).train()
    torch.manual_seed(10 + rank)  # ranks would draw different stage counts without the broadcast
    active = [int(rq(_rank_latents(rank, step, 4)).metrics["active_stages"]) for step in range(8)]
    torch.save({"state": rq.state_dict(), "active": active}, f"{out_dir}/rank{rank}.pt")


def test_residual_quantizer_dropout_runs_the_same_stages_on_every_rank(tmp_path):
    run_ranks(_residual_worker, tmp_path, str(tmp_path))
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["active"] == r1["active"]
    assert len(set(r0["active"])) > 1  # dropout did vary the stage count
    for key in r0["state"]:
        assert torch.equal(r0["state"][key], r1["state"][key]), key


def _lfq(num_bits: int) -> LFQ:
    return LFQ(dim=num_bits, entropy_weight=0.1, exact_entropy_max_bits=10).train()


def _lfq_worker(rank: int, world_size: int, out_dir: str, num_bits: int) -> None:
    z = _rank_latents(rank, 0, num_bits).mul(0.3).requires_grad_(True)
    out = _lfq(num_bits)(z)
    sum(out.losses.values()).backward()
    if rank == 1:
        with torch.no_grad():  # evaluation on one rank alone: no collective
            _lfq(num_bits).eval()(z)
    torch.save({"codebook_entropy": out.metrics["codebook_entropy"], "grad": z.grad}, f"{out_dir}/rank{rank}.pt")


@pytest.mark.parametrize("num_bits", [6, 14], ids=["exact", "factorised"])
def test_lfq_codebook_entropy_is_the_global_batch_entropy(tmp_path, num_bits):
    run_ranks(_lfq_worker, tmp_path, str(tmp_path), num_bits)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    # One process on both ranks' latents together is the reference.
    z = torch.cat([_rank_latents(r, 0, num_bits).mul(0.3) for r in (0, 1)]).requires_grad_(True)
    out = _lfq(num_bits)(z)
    sum(out.losses.values()).backward()
    for r, rank in enumerate(ranks):
        assert torch.allclose(rank["codebook_entropy"], out.metrics["codebook_entropy"], atol=1e-6)
        # DDP averages the ranks' gradients: each rank's share of the global gradient is grad / 2.
        assert torch.allclose(rank["grad"] / 2, z.grad[2 * r : 2 * r + 2], atol=1e-7)
