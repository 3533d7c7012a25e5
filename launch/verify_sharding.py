"""Check that splitting the heads over tensor-parallel ranks changes no bit of the softmax.

    torchrun --standalone --nproc-per-node N launch/verify_sharding.py [--seed S] [--cases A,B]
                                                                     [--quick] [--device auto|cpu|cuda]
                                                                     [--timeout SECONDS]

For every case of a grid (float16 / bfloat16 / float32; causal, windows, alibi tensors and
slopes, bool and additive masks including per-head ones; prefill Q == K, decode Q == 1 and
chunked prefill 1 < Q < K; head counts that the world size divides and that it does not),
every rank builds the full problem from the same seed and computes its own heads with
``TPSoftmax`` (rank and world size from the process group). The shards are all-gathered as raw
bytes and compared with ``attention_softmax`` on the full problem (``head_offset=0``) on the
same device: a case passes when they are equal bit for bit, the promise of SPEC section 2.
Rank 0 prints one row per case and a summary line; the exit status is 1 when any case failed on
any rank, 2 when the ranks disagree on their options or cases.

The backend is NCCL when each rank has a GPU (rank r on cuda:LOCAL_RANK), gloo otherwise. Every
collective is bounded by --timeout. Run without torchrun it is a world of one process.

Self-test: ``--inject-fault KIND`` (not shown by --help) makes the last rank misbehave so that
the check can be seen to fail: ``head-offset`` (reads the heads one to the side), ``bits``
(flips the lowest bit of one output element), ``raise`` (raises inside every case),
``stall`` (sleeps for three timeouts, so the other ranks' collectives time out), ``options``
(a different --seed) and ``shapes`` (a different K in the first case).
"""

import argparse
import datetime
import gc
import math
import os
import socket
import sys
import time
import zlib
from dataclasses import asdict, dataclass, replace
from typing import List, Optional

import torch
import torch.distributed as dist

# From a checkout, without installing: the package sits beside launch/.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # teardown
from tp_softmax import TPSoftmax, attention_softmax, head_partition  # noqa: E402
from teardown import exit_now  # noqa: E402

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
FAULTS = ("head-offset", "bits", "raise", "stall", "options", "shapes")


@dataclass(frozen=True)
class Case:
    name: str
    dtype: str
    batch: int
    heads: int            # total (global) heads
    q: int
    k: int
    causal: bool = False
    window: Optional[int] = None
    alibi: Optional[str] = None   # "3d" [B*H, 1, K] | "4d" [1, H, Q, K] | "slopes" [H] | "slopes2d" [B, H]
    mask: Optional[str] = None    # "bool-pad" | "add-pad" [B,1,1,K] | "bool-head" [B,H,Q,K] | "add-head" [1,H,Q,K]
    layer_scale: float = 1.0


# (name, shape and flags, head count): "div" = 3 * world size, "odd" = 3 * world size + 1, or a
# fixed count (replaced by 3 * world size + 2 when it is below the world size).
SCENARIOS = [
    ("prefill-causal", dict(batch=2, q=64, k=64, causal=True), 14),
    ("decode", dict(batch=4, q=1, k=257), "odd"),
    ("chunk-causal", dict(batch=2, q=7, k=100, causal=True), "div"),
    ("prefill-window", dict(batch=2, q=48, k=48, causal=True, window=9), 14),
    ("chunk-window-only", dict(batch=1, q=5, k=77, window=6), "odd"),
    ("decode-alibi3d-addpad", dict(batch=3, q=1, k=129, alibi="3d", mask="add-pad"), 14),
    ("prefill-alibi3d-boolpad", dict(batch=2, q=40, k=40, causal=True, alibi="3d", mask="bool-pad"), "div"),
    ("chunk-alibi4d", dict(batch=2, q=6, k=70, causal=True, alibi="4d"), "odd"),
    ("prefill-slopes", dict(batch=2, q=33, k=33, causal=True, alibi="slopes", layer_scale=0.125), 14),
    ("decode-slopes2d-boolpad", dict(batch=3, q=1, k=300, alibi="slopes2d", mask="bool-pad"), "odd"),
    ("chunk-boolhead", dict(batch=2, q=9, k=31, mask="bool-head"), "div"),
    ("prefill-addhead", dict(batch=2, q=12, k=12, causal=True, mask="add-head", layer_scale=0.5), "odd"),
    ("chunk-emptyrows", dict(batch=3, q=4, k=20, causal=True, mask="bool-empty"), 14),
    # rows the CUDA kernel shares between 512-thread blocks: one a row (20000 16-bit keys), a
    # cluster of 16 (300000)
    ("decode-long", dict(batch=2, q=1, k=20000), "odd"),
    ("decode-longest-slopes", dict(batch=1, q=1, k=300000, alibi="slopes"), "div"),
]


def make_cases(world: int, quick: bool) -> List[Case]:
    cases = []
    for index, (name, params, heads) in enumerate(SCENARIOS):
        if heads == "div":
            heads = 3 * world
        elif heads == "odd":
            heads = 3 * world + 1
        elif heads < world:
            heads = 3 * world + 2
        dtypes = [list(DTYPES)[index % len(DTYPES)]] if quick else list(DTYPES)
        for dtype in dtypes:
            cases.append(Case(name=f"{name}-h{heads}-{dtype}", dtype=dtype, heads=heads, **params))
    return cases


def build_problem(case: Case, seed: int, device: torch.device):
    """The full problem of ``case``: scores [B, H_total, Q, K] and the global keyword arguments."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(case.name.encode()))
    dtype = DTYPES[case.dtype]
    b, h, q, k = case.batch, case.heads, case.q, case.k
    scores = (torch.randn(b, h, q, k, generator=gen) * 4).to(dtype)
    kwargs = dict(causal=case.causal, window=case.window, layer_scale=case.layer_scale)
    slopes = torch.rand(h, generator=gen) * 0.9 + 0.05
    if case.alibi == "3d":  # BLOOM: slope * key position, one row per (batch, head)
        kwargs["alibi"] = (slopes.view(1, h, 1) * torch.arange(k)).expand(b, h, k).reshape(b * h, 1, k).to(dtype)
    elif case.alibi == "4d":
        kwargs["alibi"] = torch.randn(1, h, q, k, generator=gen).to(dtype)
    elif case.alibi == "slopes":
        kwargs["alibi_slopes"] = slopes
    elif case.alibi == "slopes2d":
        kwargs["alibi_slopes"] = torch.rand(b, h, generator=gen)
    if case.mask in ("bool-pad", "add-pad", "bool-empty"):
        keep = torch.ones(b, 1, 1, k, dtype=torch.bool)
        for row in range(b):  # a different amount of left padding per batch row
            keep[row, ..., : (row * k) // (2 * b)] = False
        if case.mask == "bool-empty":
            keep[b // 2] = False  # one batch row with no visible key: all zeros
        if case.mask == "add-pad":
            kwargs["mask"] = torch.zeros(b, 1, 1, k, dtype=dtype).masked_fill_(~keep, float("-inf"))
        else:
            kwargs["mask"] = keep
    elif case.mask == "bool-head":
        kwargs["mask"] = torch.rand(b, h, q, k, generator=gen) > 0.3
    elif case.mask == "add-head":
        kwargs["mask"] = torch.randn(1, h, q, k, generator=gen).to(dtype)
    moved = {key: value.to(device) if isinstance(value, torch.Tensor) else value for key, value in kwargs.items()}
    return scores.to(device), moved


def compute_shard(case: Case, scores, kwargs, group, fault: Optional[str], is_last: bool, timeout: float):
    if is_last and fault == "stall":
        time.sleep(3 * timeout)
    module = TPSoftmax(case.heads, group)
    offset, count = module.head_offset, module.local_heads
    local = scores[:, offset:offset + count].contiguous()
    if is_last and fault == "head-offset":
        module.head_offset = offset - 1 if offset > 0 else offset + 1
    if is_last and fault == "raise":
        raise RuntimeError("fault injected by --inject-fault raise")
    out = module(local, **kwargs).contiguous()
    if is_last and fault == "bits":
        out.view(-1)[:1].view(_int_dtype(out.dtype)).bitwise_xor_(1)
    return out


def _int_dtype(dtype):
    return torch.int16 if dtype.itemsize == 2 else torch.int32


def gather_heads(out: torch.Tensor, case: Case, world: int, group) -> torch.Tensor:
    """All-gather every rank's heads, as raw bytes (exact, and fine with gloo and NCCL)."""
    blocks = [head_partition(case.heads, world, r) for r in range(world)]
    widest = max(count for _, count in blocks)
    b, _, q, k = out.shape
    padded = out.new_zeros(b, widest, q, k)
    padded[:, : out.size(1)] = out
    raw = padded.view(torch.uint8)
    pieces = [torch.empty_like(raw) for _ in range(world)]
    dist.all_gather(pieces, raw, group=group)
    return torch.cat([p.view(out.dtype)[:, :count] for p, (_, count) in zip(pieces, blocks)], dim=1)


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    diff = (a - b).abs()
    diff = torch.where(a.isnan() & b.isnan(), torch.zeros_like(diff), diff)
    diff = torch.where(a.isnan() ^ b.isnan(), torch.full_like(diff, math.inf), diff)
    return diff.max().item() if diff.numel() else 0.0


def check_agreement(mine: dict, group, world: int) -> Optional[str]:
    """Exchange options and cases; a description of the first disagreement, or None."""
    everyone = [None] * world
    dist.all_gather_object(everyone, mine, group=group)
    for rank, theirs in enumerate(everyone[1:], start=1):
        for key in mine:
            if theirs[key] == everyone[0][key]:
                continue
            if key == "cases":
                for ours, other in zip(everyone[0][key], theirs[key]):
                    if ours != other:
                        return f"ranks 0 and {rank} disagree on case {ours['name']}: {ours} vs {other}"
                return f"ranks 0 and {rank} have {len(everyone[0][key])} and {len(theirs[key])} cases"
            return f"ranks 0 and {rank} disagree on {key}: {everyone[0][key]!r} vs {theirs[key]!r}"
    return None


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=0, help="seed of every case's inputs (default 0)")
    parser.add_argument("--cases", default="", help="comma-separated substrings: run the cases whose name contains one")
    parser.add_argument("--quick", action="store_true", help="one dtype per scenario instead of all three")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="auto: CUDA + NCCL when every local rank has a GPU, else CPU + gloo")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds any collective may wait (default 120)")
    parser.add_argument("--inject-fault", choices=FAULTS, default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def pick_device(choice: str) -> torch.device:
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    has_gpus = torch.cuda.is_available() and torch.cuda.device_count() >= local_world
    if choice == "cuda" and not has_gpus:
        raise SystemExit(f"verify_sharding: --device cuda needs {local_world} GPUs per node, "
                         f"found {torch.cuda.device_count() if torch.cuda.is_available() else 0}")
    if choice == "cuda" or (choice == "auto" and has_gpus):
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def init_group(device: torch.device, timeout: float):
    backend = "nccl" if device.type == "cuda" else "gloo"
    kwargs = dict(backend=backend, timeout=datetime.timedelta(seconds=timeout))
    if device.type == "cuda":
        kwargs["device_id"] = device
    if "RANK" not in os.environ:  # started without torchrun: a world of one
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        kwargs.update(init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    dist.init_process_group(**kwargs)
    return backend


def run(args) -> int:
    device = pick_device(args.device)
    backend = init_group(device, args.timeout)
    group = dist.group.WORLD
    rank, world = dist.get_rank(), dist.get_world_size()
    is_last = rank == world - 1
    fault = args.inject_fault
    cases = make_cases(world, args.quick)
    if args.cases:
        wanted = [w for w in args.cases.split(",") if w]
        cases = [c for c in cases if any(w in c.name for w in wanted)]
    if is_last and fault == "shapes" and cases:
        cases[0] = replace(cases[0], k=cases[0].k + 1)
    seed = args.seed + 1 if is_last and fault == "options" else args.seed
    mine = dict(options=dict(seed=seed, cases=args.cases, quick=args.quick, device=device.type,
                             fault=fault),
                world_size=world, torch=torch.__version__, cases=[asdict(c) for c in cases])
    problem = check_agreement(mine, group, world)
    if problem is not None:
        if rank == 0:
            print(f"verify_sharding: {problem}", file=sys.stderr, flush=True)
        return 2
    if not cases:
        if rank == 0:
            print(f"verify_sharding: no case matches --cases {args.cases!r}", file=sys.stderr, flush=True)
        return 2

    if rank == 0:
        print(f"tp_softmax sharding check: world size {world}, backend {backend}, device {device.type}, "
              f"seed {seed}, {len(cases)} cases", flush=True)
        print(f"{'case':<40} {'max abs diff':>12} {'bitwise':>8}  result", flush=True)
    failed = []
    for case in cases:
        scores, kwargs = build_problem(case, seed, device)
        offset, count = head_partition(case.heads, world, rank)
        error = None
        try:
            out = compute_shard(case, scores, kwargs, group, fault, is_last, args.timeout)
            if out.shape != (case.batch, count, case.q, case.k) or out.dtype != scores.dtype:
                error = f"shard of shape {tuple(out.shape)} and dtype {out.dtype}, expected {count} heads of {scores.dtype}"
        except Exception as exc:  # reported by rank 0 below; the other ranks must not wait for us
            error = f"{type(exc).__name__}: {exc}"
        if error is not None:
            out = torch.zeros(case.batch, count, case.q, case.k, dtype=scores.dtype, device=device)
        single = attention_softmax(scores, head_offset=0, **kwargs).contiguous()
        mine_single = single[:, offset:offset + count].contiguous()
        local_ok = error is None and torch.equal(out.view(torch.uint8), mine_single.view(torch.uint8))
        gathered = gather_heads(out, case, world, group)
        reports = [None] * world
        dist.all_gather_object(reports, dict(error=error, local_ok=local_ok), group=group)
        if rank == 0:
            bitwise = torch.equal(gathered.view(torch.uint8), single.view(torch.uint8))
            errors = [f"rank {r}: {rep['error']}" for r, rep in enumerate(reports) if rep["error"]]
            bad_ranks = [r for r, rep in enumerate(reports) if not rep["local_ok"]]
            ok = bitwise and not errors and not bad_ranks
            diff = max_abs_diff(gathered, single)
            print(f"{case.name:<40} {diff:>12.3g} {'yes' if bitwise else 'no':>8}  {'pass' if ok else 'FAIL'}",
                  flush=True)
            for line in errors:
                print(f"    {line}", flush=True)
            if not errors and bad_ranks:
                print(f"    ranks whose own shard differs: {bad_ranks}", flush=True)
            if not ok:
                failed.append(case.name)
    verdict = torch.tensor([len(failed)], dtype=torch.int64, device=device)
    dist.all_reduce(verdict, group=group)  # every rank leaves with rank 0's verdict
    if rank == 0:
        if failed:
            print(f"SUMMARY: {len(failed)} of {len(cases)} cases FAILED: {', '.join(failed)}", flush=True)
        else:
            print(f"SUMMARY: all {len(cases)} cases passed (world size {world}, {backend})", flush=True)
    return 1 if verdict.item() else 0


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        return run(args)
    finally:
        if dist.is_initialized():
            gc.collect()  # no stray reference to the group may outlive it (gloo aborts at exit)
            dist.destroy_process_group()


if __name__ == "__main__":
    exit_now(main())
