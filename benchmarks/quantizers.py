"""Quantizer speed: tokenmill's quantizers vs vector-quantize-pytorch, forward + backward.

    python benchmarks/quantizers.py            # full run (~3-4 min on 2 CPU cores), rewrites its docs section
    python benchmarks/quantizers.py --quick    # smoke run: fewer iterations, docs untouched

For every case both implementations get the same input z [B, N, dim] (fp32, requires_grad),
run in training mode, in the same process with the same thread count, and one iteration is

    out = quantizer(z); loss = codes.sum() + sum(aux losses); loss.backward()

timed with time.perf_counter (CUDA-synchronised on GPU). Warm-up iterations first, then the
timed iterations alternate ours / peer so that background load hits both alike; the table shows
medians. The peer is configured as in tests/test_fsq_residual.py and tests/test_lfq.py (no
projections, no randomness); where it cannot do exactly our computation the notes column says so.

B starts at 64 (N = 256) and is halved while one iteration of either implementation takes more
than --max-iter-s seconds, or while the peer's dense [tokens, codes] tensors (LFQ over all 2^k codes, VQ one-hots) would not fit in
--lfq-mem-gib; the "B x N" column shows what was run.

Only the section between <!-- quantizers:start --> and <!-- quantizers:end --> of
docs/benchmarks.md is rewritten (the markers are appended if absent).
"""

from __future__ import annotations

import argparse
import datetime as dt
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.machine import cpu_model  # noqa: E402
from tokenmill.quantizers.base import Quantizer  # noqa: E402
from tokenmill.quantizers.fsq import FSQ  # noqa: E402
from tokenmill.quantizers.lfq import LFQ  # noqa: E402
from tokenmill.quantizers.residual import ResidualFSQ  # noqa: E402
from tokenmill.quantizers.vq import VectorQuantizer  # noqa: E402

START, END = "<!-- quantizers:start -->", "<!-- quantizers:end -->"
N_TOKENS = 256
B_FULL = 64


@dataclass
class Case:
    name: str
    config: str
    dim: int
    make_ours: Callable[[], nn.Module]
    make_peer: Callable[[], nn.Module]
    run_peer: Callable[[nn.Module, Tensor], Tensor]  # returns the scalar loss
    notes: str
    # bytes the peer needs per token (LFQ enumerates every code), used to cap B
    peer_bytes_per_token: int = 0
    results: dict = field(default_factory=dict)


def run_ours(q: nn.Module, z: Tensor) -> Tensor:
    out = q(z)
    loss = out.codes.sum()
    for value in out.losses.values():
        loss = loss + value
    return loss


def peer_two_outputs(q: nn.Module, z: Tensor) -> Tensor:  # FSQ / ResidualFSQ: (codes, indices)
    codes, _ = q(z)
    return codes.sum()


def peer_three_outputs(q: nn.Module, z: Tensor) -> Tensor:  # VQ / LFQ: (codes, indices, aux loss)
    codes, _, aux = q(z)
    return codes.sum() + aux.sum()


def build_cases(vqp) -> list[Case]:
    cases: list[Case] = []

    def seeded(fn):
        def make():
            torch.manual_seed(0)
            return fn()

        return make

    for k in (4096, 8192):
        cases.append(
            Case(
                "VectorQuantizer (cosine)",
                f"dim 12, codebook {k}, l2-normalised",
                12,
                seeded(lambda k=k: VectorQuantizer(dim=12, codebook_size=k, use_l2_norm=True)),
                seeded(
                    lambda k=k: vqp.VectorQuantize(
                        dim=12,
                        codebook_size=k,
                        use_cosine_sim=True,
                        ema_update=False,
                        learnable_codebook=False,
                        rotation_trick=False,
                        commitment_weight=0.25,
                    )
                ),
                peer_three_outputs,
                "peer: cosine + learnable codebook is refused, so its codebook is frozen (no EMA, no "
                "codebook loss/grad); ours also learns the codebook",
            )
        )
    # EMA codebooks (the peer's default), like-for-like: same decay, same search, no codebook loss.
    # The peer builds dense [tokens, K] tensors (distances, an int64 one-hot and its float copy).
    vq_peer_bytes = lambda k: 24 * k  # noqa: E731
    for k in (4096, 8192, 2**18):
        cases.append(
            Case(
                "VectorQuantizer (cosine, EMA)",
                f"dim 12, codebook {k}, l2-normalised, EMA decay 0.99",
                12,
                seeded(lambda k=k: VectorQuantizer(dim=12, codebook_size=k, use_l2_norm=True, ema_decay=0.99)),
                seeded(
                    lambda k=k: vqp.VectorQuantize(
                        dim=12, codebook_size=k, use_cosine_sim=True, decay=0.99, rotation_trick=False,
                        commitment_weight=0.25,
                    )
                ),
                peer_three_outputs,
                "like-for-like: EMA update with Laplace smoothing on both, straight-through",
                vq_peer_bytes(k),
            )
        )
    cases.append(
        Case(
            "VectorQuantizer (Euclidean, EMA, rotation trick)",
            "dim 32, codebook 8192, EMA decay 0.99, rotation trick",
            32,
            seeded(
                lambda: VectorQuantizer(
                    dim=32, codebook_size=8192, use_l2_norm=False, ema_decay=0.99, rotation_trick=True
                )
            ),
            seeded(
                lambda: vqp.VectorQuantize(
                    dim=32, codebook_size=8192, decay=0.99, rotation_trick=True, commitment_weight=0.25
                )
            ),
            peer_three_outputs,
            "like-for-like: EMA update and rotation-trick gradient on both",
        )
    )
    cases.append(
        Case(
            "VectorQuantizer (Euclidean)",
            "dim 32, codebook 8192",
            32,
            seeded(lambda: VectorQuantizer(dim=32, codebook_size=8192, use_l2_norm=False)),
            seeded(
                lambda: vqp.VectorQuantize(
                    dim=32,
                    codebook_size=8192,
                    ema_update=False,
                    learnable_codebook=True,
                    rotation_trick=False,
                    commitment_weight=0.25,
                )
            ),
            peer_three_outputs,
            "peer: learnable codebook, no EMA, plain straight-through; one mse(q, z) term with grads to "
            "both (ours: separate codebook + commitment terms)",
        )
    )
    for levels in ([8, 8, 8, 5, 5, 5], [8, 5, 5, 5]):
        cases.append(
            Case(
                "FSQ",
                f"levels {levels} ({torch.tensor(levels).prod().item()} codes)",
                len(levels),
                lambda levels=levels: FSQ(levels),
                lambda levels=levels: vqp.FSQ(levels=levels),
                peer_two_outputs,
                "same codes/indices (bitwise)",
            )
        )

    def peer_lfq(dim, groups=1, spherical=False):
        return vqp.LFQ(
            dim=dim,
            codebook_size=2 ** (dim // groups),
            num_codebooks=groups,
            entropy_loss_weight=0.1,
            commitment_loss_weight=0.25,
            diversity_gamma=1.0,
            has_projections=False,
            frac_per_sample_entropy=1.0,
            codebook_scale=1.0,
            spherical=spherical,
        )

    # The peer materialises [tokens, groups, 2^k] fp32 tensors (distances, softmax, log, grads).
    lfq_bytes = lambda groups, k: groups * 2**k * 4 * 8  # noqa: E731  ~8 live tensors of that size
    cases += [
        Case(
            "LFQ",
            "dim 18 (2^18 codes, Open-MAGVIT2)",
            18,
            lambda: LFQ(18),
            lambda: peer_lfq(18),
            peer_three_outputs,
            "NOT the same entropy: ours (default exact_entropy_max_bits=10) uses the factorised "
            "codebook entropy, the peer enumerates all 2^18 codes per token; B x N reduced for the peer's memory and time",
            lfq_bytes(1, 18),
        ),
        Case(
            "LFQ",
            "dim 18, exact codebook entropy (exact_entropy_max_bits=18)",
            18,
            lambda: LFQ(18, exact_entropy_max_bits=18),
            lambda: peer_lfq(18),
            peer_three_outputs,
            "like-for-like: both enumerate the 2^18 codes per token; B x N reduced for the peer's memory and time",
            lfq_bytes(1, 18),
        ),
        Case(
            "LFQ (grouped)",
            "dim 18, num_groups=2 (2 x 2^9 codes)",
            18,
            lambda: LFQ(18, num_groups=2),
            lambda: peer_lfq(18, groups=2),
            peer_three_outputs,
            "peer num_codebooks=2; same computation (exact entropy over 2^9 per group)",
            lfq_bytes(2, 9),
        ),
        Case(
            "LFQ (spherical = BSQ)",
            "dim 18, spherical=True",
            18,
            lambda: LFQ(18, spherical=True),
            lambda: peer_lfq(18, spherical=True),
            peer_three_outputs,
            "as LFQ dim 18: ours factorised entropy, peer enumerates 2^18 codes; B x N reduced for the peer's memory and time",
            lfq_bytes(1, 18),
        ),
        Case(
            "ResidualFSQ",
            "levels [8, 5, 5, 5] x 4 stages",
            4,
            lambda: ResidualFSQ([8, 5, 5, 5], num_quantizers=4),
            lambda: vqp.ResidualFSQ(levels=[8, 5, 5, 5], num_quantizers=4),
            peer_two_outputs,
            "same codes/indices (bitwise)",
        ),
    ]
    return cases


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def one_iteration(q: nn.Module, run: Callable, z0: Tensor, device: torch.device) -> float:
    q.zero_grad(set_to_none=True)
    z = z0.detach().clone().requires_grad_(True)
    sync(device)
    t0 = time.perf_counter()
    loss = run(q, z)
    loss.backward()
    sync(device)
    return time.perf_counter() - t0


def latents(batch: int, tokens: int, dim: int, device: torch.device) -> Tensor:
    g = torch.Generator().manual_seed(1234)
    return (torch.randn(batch, tokens, dim, generator=g) * 1.5).to(device)


def make_ours(case: Case, with_metrics: bool, device: torch.device) -> nn.Module:
    ours = case.make_ours().to(device).train()
    for module in ours.modules():  # what quantizer_metrics() does for one training step
        if isinstance(module, Quantizer):
            module.compute_metrics = with_metrics
    return ours


def bench_case(case: Case, args, device: torch.device) -> None:
    ours = make_ours(case, args.with_metrics, device)
    peer = case.make_peer().to(device).train()
    batch, tokens = B_FULL, N_TOKENS
    if case.peer_bytes_per_token:
        while batch > 1 and batch * tokens * case.peer_bytes_per_token > args.lfq_mem_gib * 2**30:
            batch //= 2
    # Probe one iteration each; if the slower exceeds max_iter_s, shrink B (then N, once B is 1)
    # by the power of two that brings it under, and probe again.
    for _ in range(4):
        z0 = latents(batch, tokens, case.dim, device)
        first = [one_iteration(ours, run_ours, z0, device), one_iteration(peer, case.run_peer, z0, device)]
        slow = max(first)
        if slow <= args.max_iter_s or batch * tokens == 1:
            break
        shrink = 2 ** max(1, math.ceil(math.log2(slow / args.max_iter_s)))
        while shrink > 1 and batch > 1:
            batch, shrink = batch // 2, shrink // 2
        while shrink > 1 and tokens > 1:
            tokens, shrink = tokens // 2, shrink // 2
    for _ in range(args.warmup - 1):
        one_iteration(ours, run_ours, z0, device)
        one_iteration(peer, case.run_peer, z0, device)
    # Cap the time spent per case: slow cases get fewer (at least 3) timed iterations.
    iters = max(3, min(args.iters, int(args.case_budget_s / max(sum(first), 1e-9))))
    t_ours, t_peer = [], []
    for _ in range(iters):
        t_ours.append(one_iteration(ours, run_ours, z0, device))
        t_peer.append(one_iteration(peer, case.run_peer, z0, device))
    case.results = {
        "batch": batch,
        "tokens": tokens,
        "iters": iters,
        "ours_ms": 1e3 * statistics.median(t_ours),
        "peer_ms": 1e3 * statistics.median(t_peer),
    }
    case.results["ratio"] = case.results["peer_ms"] / case.results["ours_ms"]


def profile_case(case: Case, device: torch.device, with_metrics: bool, rows: int = 8) -> str:
    """Top self-CPU ops of ours and the peer for one case (same B as the timed run)."""
    from torch.profiler import ProfilerActivity, profile

    batch, tokens = case.results["batch"], case.results["tokens"]
    z0 = latents(batch, tokens, case.dim, device)
    blocks = []
    for label, q, run in (
        ("ours", make_ours(case, with_metrics, device), run_ours),
        ("peer", case.make_peer().to(device).train(), case.run_peer),
    ):
        one_iteration(q, run, z0, device)
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=acts) as prof:
            for _ in range(3):
                one_iteration(q, run, z0, device)
        table = prof.key_averages().table(
            sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=40
        )
        blocks.append(
            f"--- {label}: {case.name}, {case.config}, B x N = {batch} x {tokens} (3 iterations)\n{table}"
        )
    return "\n".join(blocks)




def load1() -> float:
    return os.getloadavg()[0]


def table_lines(cases: list[Case]) -> list[str]:
    lines = [
        "| quantizer | config | B x N | ours ms (median) | peer ms (median) | speed ratio (peer/ours, >1 = we are faster) | notes |",
        "|---|---|---|---:|---:|---:|---|",
    ]
    for c in cases:
        r = c.results
        full = r["batch"] == B_FULL and r["tokens"] == N_TOKENS
        bxn = f"{r['batch']} x {r['tokens']}" + ("" if full else f" (reduced from {B_FULL} x {N_TOKENS})")
        lines.append(
            f"| {c.name} | {c.config} | {bxn} | {r['ours_ms']:.2f} | {r['peer_ms']:.2f} | {r['ratio']:.2f} | {c.notes} |"
        )
    return lines


ANALYSIS = """\
**Reading the table.** Every ratio is >= 1 in the run above. The elementwise quantizers (FSQ,
ResidualFSQ) do the same arithmetic as the peer (their codes are bitwise equal), so they sit near
parity (~1.1-1.3x over the runs so far; at ~2 ms per step a scheduling spike moves a single run by +-0.15). Their histogram
metrics are what used to put them below 1: a `bincount` over the whole codebook plus
entropy/perplexity costs ~0.4 ms for 64000 codes, 20 % of an FSQ step. `TokenizerTask` therefore
computes the metrics only on the steps Lightning logs (`quantizer_metrics`), which is what the
table times; with `--with-metrics` (every step) FSQ with 64000 codes measures ~0.8x.

VQ is ~2.6-3.3x faster in every variant, EMA and rotation trick included. Both sides spend their
time in the [tokens, K] distance matmul and argmax, but the peer also fills a dense [tokens, K]
one-hot (`fill_` + `scatter_`), copies [tokens, K] tensors and runs a second [tokens, K] `bmm` per
forward (for its EMA sums too), where we gather codes with `F.embedding` and accumulate EMA
statistics with `index_add_`. The dense one-hot is also why the peer's 2^18-code rows had to be
shrunk (64 x 256 tokens would need 34 GB).

Grouped LFQ (~2.5x) factorises the per-sample entropy over bits instead of a softmax over 2 x 2^9
codes per token; the like-for-like exact 2^18-code LFQ entropy is ~2.3x. The default LFQ / BSQ rows
(hundreds of x) are not the same computation: ours uses the factorised codebook entropy for groups
above `exact_entropy_max_bits=10` bits, the peer enumerates all 2^18 codes per token.
"""


def write_docs(path: Path, cases: list[Case], meta: dict, profile_text: str) -> None:
    worst = min(cases, key=lambda c: c.results["ratio"])
    worst_label = f"{worst.name}, {worst.config}, ratio {worst.results['ratio']:.2f}"
    lines = [
        START,
        "## Quantizers (`benchmarks/quantizers.py`)",
        "",
        f"Produced by `python benchmarks/quantizers.py` on {meta['date']}. Rerun it to refresh this "
        "section (other sections of this file are left alone).",
        "",
        f"- machine: {meta['cpu']}, {meta['cores']} cores; {meta['threads']} torch threads; "
        f"torch {meta['torch']}; vector-quantize-pytorch {meta['vqp']} (the peer); device {meta['device']}",
        f"- 1-minute load average before / after: {meta['load_before']:.2f} / {meta['load_after']:.2f}",
        f"- one iteration = forward + backward in training mode, fp32, z [B, {N_TOKENS}, dim] with "
        "requires_grad, loss = codes.sum() + sum of aux losses; "
        f"{meta['warmup']} warm-up + up to {meta['iters']} timed iterations per implementation (slow cases: "
        f"fewer, at least 3, about {meta['case_budget_s']:.0f} s per case), alternating "
        "ours / peer, same input; medians of `time.perf_counter` (CUDA-synchronised on GPU).",
        f"- B x N starts at {B_FULL} x {N_TOKENS}; B (then N, once B is 1) is halved while one iteration "
        f"exceeds {meta['max_iter_s']} s or the peer's dense [tokens, codes] tensors (LFQ over all 2^k codes, VQ one-hots) would exceed "
        f"{meta['lfq_mem_gib']} GiB; reduced rows say so.",
        "- ours runs with its histogram metrics (usage / entropy / perplexity) "
        + ("ON (`--with-metrics`)." if meta["with_metrics"] else "off, as on every training step "
           "that logs nothing (`TokenizerTask` computes them only on Lightning's logging steps); the "
           "peer computes none. `--with-metrics` times them in."),
        "",
        *table_lines(cases),
        "",
        ANALYSIS,
        f"Profile of the lowest-ratio case in this run ({worst_label}; top self-CPU ops, 3 iterations):",
        "",
        "```text",
        profile_text.rstrip(),
        "```",
        END,
    ]
    section = "\n".join(lines) + "\n"
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    if START in text and END in text:
        head, rest = text.split(START, 1)
        _, tail = rest.split(END, 1)
        text = head + section.rstrip("\n") + tail
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="1 warm-up + 3 timed iterations, docs untouched")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=9)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--max-iter-s", type=float, default=2.0, help="halve B while one iteration is slower")
    p.add_argument("--case-budget-s", type=float, default=15.0, help="fewer timed iterations beyond this")
    p.add_argument(
        "--lfq-mem-gib", type=float, default=4.0,
        help="memory cap for the peer's [tokens, codes] tensors (LFQ 2^k codes, VQ one-hots)"
    )
    p.add_argument("--cases", nargs="*", default=None, help="substring filter on 'quantizer config'")
    p.add_argument("--profile", action="store_true", help="print the profile of the lowest-ratio case")
    p.add_argument(
        "--with-metrics",
        action="store_true",
        help="time ours with its histogram metrics on (training computes them only on logging steps)",
    )
    p.add_argument("--docs", type=Path, default=ROOT / "docs" / "benchmarks.md")
    p.add_argument("--no-docs", action="store_true")
    args = p.parse_args()
    if args.quick:
        args.warmup, args.iters, args.case_budget_s = 1, 3, 3.0
    args.warmup = max(args.warmup, 1)
    if args.threads:
        torch.set_num_threads(args.threads)

    from importlib.metadata import version

    import vector_quantize_pytorch as vqp

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cases = build_cases(vqp)
    if args.cases:
        cases = [c for c in cases if any(s.lower() in f"{c.name} {c.config}".lower() for s in args.cases)]
    meta = {
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "vqp": version("vector-quantize-pytorch"),
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "load_before": load1(),
        "warmup": args.warmup,
        "iters": args.iters,
        "max_iter_s": args.max_iter_s,
        "lfq_mem_gib": args.lfq_mem_gib,
        "case_budget_s": args.case_budget_s,
        "with_metrics": args.with_metrics,
    }
    print(
        f"{meta['cpu']} | {meta['threads']} threads | torch {meta['torch']} | vqp {meta['vqp']} | "
        f"load {meta['load_before']:.2f}",
        flush=True,
    )
    t_start = time.perf_counter()
    for case in cases:
        t0 = time.perf_counter()
        bench_case(case, args, device)
        r = case.results
        print(
            f"  {case.name:28s} {case.config:58s} {r['batch']:2d}x{r['tokens']:3d} it={r['iters']:2d}  ours {r['ours_ms']:9.2f} ms  "
            f"peer {r['peer_ms']:9.2f} ms  ratio {r['ratio']:6.2f}  ({time.perf_counter() - t0:.0f} s)",
            flush=True,
        )
    meta["load_after"] = load1()
    print(f"total {time.perf_counter() - t_start:.0f} s, load after {meta['load_after']:.2f}\n")
    print("\n".join(table_lines(cases)))

    worst = min(cases, key=lambda c: c.results["ratio"])
    profile_text = ""
    if args.profile or not (args.quick or args.no_docs):
        profile_text = profile_case(worst, device, args.with_metrics)
        if args.profile:
            print("\n" + profile_text)
    if not (args.quick or args.no_docs):
        write_docs(args.docs, cases, meta, profile_text)
        print(f"\nwrote {args.docs.relative_to(ROOT) if args.docs.is_relative_to(ROOT) else args.docs}")


if __name__ == "__main__":
    main()
