#!/usr/bin/env python
"""Benchmark tp_softmax against the byte floor, torch eager, torch.compile and DeepSpeed.

One GPU:                 python launch/bench.py [--out DIR]
One process per GPU:     torchrun --nproc-per-node N launch/bench.py [...]
Per-rank scaling (BLOOM-176B on 4 ranks):
                         torchrun --nproc-per-node 4 launch/bench.py --only bloom176b-tp4
CPU check of the code:   python launch/bench.py --smoke --device cpu --out /tmp/bench

Cases: the public case table (``--list`` prints it), plus ``--case [NAME=]B,H,mp,Q,K,dtype[,flags]``
(flags joined by ``+``: causal, alibi, slopes, pad, boolpad, window=N, scale=F, scaling). ``--only
NAME`` (names or shell patterns) picks among the named cases, the ones outside the default run
(such as ``bloom176b-tp4``) included; a case given with ``--case`` always runs. B, H and mp
describe one rank: H is its head count, the model has H * mp heads. Run on one process, a case is
the LAST rank's shard (head_offset = (mp-1) * H, the convention of the public table); under
torchrun, rank r times shard r % mp, all ranks at once, and rank 0 reports the slowest rank.

A ``scaling`` case (``bloom176b-tp4``) is also timed unsharded (all heads) on rank 0 alone; then
every rank times its shard (``head_partition(H_total, world, rank)``; on one process the mp shards
one after another) and the report compares the slowest shard with 1/world of the unsharded time.

Contenders, timed in the same run on the same inputs:
  copy        a device copy of the scores (the floor's bandwidth, per case); beside it, a device
              copy of the case's floor bytes (half read, half written; column floor_copy_ms):
              no op that moves those bytes can beat it by much, so a target that needs less
              time than it is marked as beyond the copy in the summary
  tp_softmax  tp_softmax.attention_softmax (the path that ran: CUDA kernel or PyTorch fallback)
  eager       the obvious PyTorch composition (launch/benchlib.py: eager_softmax)
  compile     the same function through torch.compile
  deepspeed   DeepSpeed's inference kernel (ds_softmax / attn_softmax_v2, in place), built with
              InferenceBuilder in a background process while the others run
              (--deepspeed-build-timeout); "not available: why" when it can't be had.

Each row: median ms (CUDA events, many repetitions after warm-up, small problems rotate
input sets so every repetition reads cold inputs), GB/s (2 x score bytes / time), the floor
(fewest bytes / measured copy bandwidth) and efficiency (floor / time), tp_softmax's speed-up
over the contender, and correctness on fresh random inputs with the output poisoned first: max
error vs a float64 reference on sampled rows, what rows with no visible key became, rows with a
NaN and the worst row-sum error over the whole output. Output: a table, then a per-case summary
(printed last); DIR/bench.csv, DIR/bench_env.json, DIR/bench_efficiency.png (with matplotlib).
"""

import argparse
import csv
import datetime
import fnmatch
import importlib.util
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
import warnings
from dataclasses import replace
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))
try:
    import tp_softmax
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))
    import tp_softmax

import torch  # noqa: E402

import benchlib as bl  # noqa: E402
from tp_softmax import attention_softmax, head_partition  # noqa: E402

CSV_COLUMNS = [
    "case", "contender", "status", "path", "dtype", "B", "H_local", "H_total", "mp", "head_offset",
    "Q", "K", "flags", "ranks", "slowest_rank", "ms", "ms_per_rank", "spread", "reps", "sets",
    "host_us", "gbps", "floor_bytes", "floor_ms", "floor_copy_ms", "efficiency", "own_efficiency", "speedup",
    "err", "masked_rows", "nan_rows", "sum_err", "scaling", "note",
]


def _brief(prefix: str, exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{prefix}: {type(exc).__name__}" + (f": {lines[0][:200]}" if lines else "")


class Unavailable(Exception):
    """A contender that cannot run on this problem; the message is the row's status."""


# ----------------------------------------------------------------------------------------------
# Processes
# ----------------------------------------------------------------------------------------------

class Dist:
    """The process group, if any (gloo: only host objects and barriers travel)."""

    def __init__(self, timeout_s: float):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.group = None
        if self.world > 1:
            import torch.distributed as dist

            dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=timeout_s))
            self.group = dist

    def barrier(self) -> None:
        if self.group is not None:
            self.group.barrier()

    def gather(self, obj):
        if self.group is None:
            return [obj]
        out = [None] * self.world if self.rank == 0 else None
        self.group.gather_object(obj, out, dst=0)
        return out

    def broadcast(self, obj):
        if self.group is None:
            return obj
        box = [obj]
        self.group.broadcast_object_list(box, src=0)
        return box[0]

    def close(self) -> None:
        if self.group is not None:
            self.group.destroy_process_group()


# ----------------------------------------------------------------------------------------------
# DeepSpeed
# ----------------------------------------------------------------------------------------------

class DeepSpeedBuild:
    """Builds DeepSpeed's inference kernels in a child process while the other contenders run,
    then loads them here. Only local rank 0 builds; the result is shared with the other ranks."""

    def __init__(self, wanted: bool, device: torch.device, dist: Dist, timeout_s: float, log: Path):
        self.dist, self.timeout_s, self.log = dist, timeout_s, log
        # The arch list DeepSpeed is built and loaded with (None: the environment's own will do).
        self.arch = None
        if wanted and device.type == "cuda":
            self.arch = bl.deepspeed_arch_list(os.environ.get("TORCH_CUDA_ARCH_LIST", ""),
                                               [torch.cuda.get_device_capability(i)
                                                for i in range(torch.cuda.device_count())])
        self.proc = None
        self.started = time.time()
        self.status = None
        if not wanted:
            self.status = "not requested"
        elif device.type != "cuda":
            self.status = "not available: needs a CUDA device"
        elif importlib.util.find_spec("deepspeed") is None:
            self.status = ("not available: the deepspeed package is not installed "
                           "(pip install 'tp_softmax[deepspeed]'; its kernel also needs nvcc and ninja)")
        elif dist.local_rank == 0:
            self.log.parent.mkdir(parents=True, exist_ok=True)
            self._log_file = open(self.log, "w")
            env = dict(os.environ)
            if self.arch is not None:
                self._log_file.write(f"DS-BENCH-NOTE: TORCH_CUDA_ARCH_LIST "
                                     f"{env.get('TORCH_CUDA_ARCH_LIST')!r} -> {self.arch!r} for DeepSpeed\n")
                self._log_file.flush()
                env["TORCH_CUDA_ARCH_LIST"] = self.arch
            self.proc = subprocess.Popen([sys.executable, "-c", bl.DEEPSPEED_BUILD_SCRIPT],
                                         stdout=self._log_file, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True, env=env)

    def _wait(self) -> str:
        if self.status is not None:
            return self.status
        if self.proc is None:
            return "pending"
        left = self.timeout_s - (time.time() - self.started)
        try:
            self.proc.wait(timeout=max(left, 1.0))
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            self._log_file.close()
            return (f"not available: its kernel did not build within {self.timeout_s:.0f} s "
                    f"(--deepspeed-build-timeout; log {self.log})")
        self._log_file.close()
        lines = self.log.read_text(errors="replace").splitlines()
        for line in reversed(lines):
            if line.startswith("DS-BENCH-OK"):
                return "ok " + line[len("DS-BENCH-OK"):].strip()
            if line.startswith("DS-BENCH-FAIL:"):
                return "not available: " + line[len("DS-BENCH-FAIL:"):].strip()
        tail = lines[-1] if lines else "no output"
        return f"not available: build exited with code {self.proc.returncode} ({tail[-200:]}; log {self.log})"

    def finish(self):
        """Return ``(module, status)``; ``module`` is None when it is not available."""
        status = self.dist.broadcast(self._wait() if self.dist.rank == 0 else None)
        if not status.startswith("ok"):
            return None, status
        saved = os.environ.get("TORCH_CUDA_ARCH_LIST")
        try:
            if self.arch is not None:
                os.environ["TORCH_CUDA_ARCH_LIST"] = self.arch  # as the build process had it
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                from deepspeed.ops.op_builder import InferenceBuilder

                module = InferenceBuilder().load(verbose=False)
        except Exception as exc:  # noqa: BLE001 - any failure makes the contender unavailable
            return None, f"not available: loading the built kernel failed: {type(exc).__name__}: {exc}"
        finally:
            if self.arch is not None:  # only set when the environment had a list
                os.environ["TORCH_CUDA_ARCH_LIST"] = saved
        return module, status


# ----------------------------------------------------------------------------------------------
# Running one rank's problem
# ----------------------------------------------------------------------------------------------

def tp_kwargs(problem: bl.Problem, st) -> dict:
    c = problem.case
    return dict(layer_scale=c.scale, alibi=st["alibi"], alibi_slopes=st["slopes"], mask=st["mask"],
                causal=c.causal, window=c.window, head_offset=problem.shard.head_offset)


def tp_path(problem: bl.Problem) -> str:
    """Which implementation attention_softmax takes for this problem, and why."""
    st = problem.sets[0]
    if not st["scores"].is_cuda:
        return "torch (cpu)"
    try:
        from tp_softmax import ops

        if ops._force_torch():
            return f"torch ({ops.FORCE_TORCH_ENV} is set)"
        from tp_softmax import _kernel

        reasons = _kernel.unsupported_reasons(ops.prepare(st["scores"], **tp_kwargs(problem, st)))
    except Exception as exc:  # noqa: BLE001 - reported, the timing still runs
        return f"unknown ({type(exc).__name__}: {exc})"
    if reasons:
        return "torch: " + "; ".join(reasons)
    try:
        scores = st["scores"]
        two = st["mask"] is not None and st["alibi"] is not None
        return f"kernel ({_kernel.row_config(scores.size(-1), scores.dtype, two_operands=two)})"
    except Exception:  # noqa: BLE001 - the variant is a detail; the path is known
        return "kernel"


class Runner:
    def __init__(self, args, device: torch.device, dist: Dist, timer, copy_bw: float):
        self.args, self.device, self.dist, self.timer, self.copy_bw = args, device, dist, timer, copy_bw
        self.ds_module = None
        self.ds_status = "not available: not built yet"
        self.l2 = (torch.cuda.get_device_properties(device).L2_cache_size
                   if device.type == "cuda" else 0)

    # -- contenders ---------------------------------------------------------------------------

    def _make(self, name: str, problem: bl.Problem):
        """Return ``(call(st), inplace, path, note)`` for one contender."""
        case, shard = problem.case, problem.shard
        if name == "copy":
            for st in problem.sets:
                st["copy_dst"] = torch.empty_like(st["scores"])
            return (lambda st: st["copy_dst"].copy_(st["scores"])), False, "", ""
        if name == "tp_softmax":
            return (lambda st: attention_softmax(st["scores"], **tp_kwargs(problem, st))), False, tp_path(problem), ""
        if name in ("eager", "compile"):
            fn = bl.eager_softmax
            if name == "compile":
                torch._dynamo.reset()
                fn = torch.compile(bl.eager_softmax, dynamic=False, backend=self.args.compile_backend)
            call = (lambda st: fn(st["scores"], case.scale, st["alibi_local"], st["slopes_local"],
                                  st["mask"], case.causal, case.window))
            return call, False, "", ""
        if name == "deepspeed":
            if self.ds_module is None:
                raise Unavailable(self.ds_status)
            refusal = bl.deepspeed_refusal(case, shard.heads)
            if refusal:
                raise Unavailable(refusal)
            try:
                fn = bl.deepspeed_function(self.ds_module, case.torch_dtype)
            except AttributeError as exc:
                raise Unavailable(f"not available: {exc}") from None
            none = torch.empty(1, dtype=case.torch_dtype, device=self.device)
            return (lambda st: bl.deepspeed_call(fn, case, shard, st, none)), True, "", ""
        raise ValueError(name)

    def _row(self, problem: bl.Problem, name: str, vrank: int) -> dict:
        c, s = problem.case, problem.shard
        return {
            "case": c.name, "contender": name, "status": "ok", "path": "", "dtype": c.dtype,
            "B": c.B, "H_local": s.heads, "H_total": c.H_total, "mp": c.mp, "head_offset": s.head_offset,
            "Q": c.Q, "K": c.K, "flags": c.flags, "ranks": 1, "slowest_rank": vrank,
            "ms": float("nan"), "ms_per_rank": "", "spread": float("nan"), "reps": 0,
            "sets": len(problem.sets), "host_us": float("nan"), "gbps": float("nan"),
            "floor_bytes": problem.floor.total, "floor_ms": problem.floor.total / self.copy_bw * 1e3,
            "floor_copy_ms": float("nan"),
            "efficiency": float("nan"), "own_efficiency": "", "speedup": float("nan"), "err": float("nan"),
            "masked_rows": "", "nan_rows": "", "sum_err": float("nan"), "scaling": "", "note": "",
        }

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def run_contender(self, name: str, problem: bl.Problem, vrank: int, concurrent: bool) -> dict:
        row = self._row(problem, name, vrank)
        call = None
        try:
            call, inplace, path, note = self._make(name, problem)
            row["path"], row["note"] = path, note
            if inplace:
                st = dict(problem.sets[0], scores=problem.sets[0]["scores"].clone())
            else:
                st = problem.sets[0]
                if self.device.type == "cuda":
                    # Leave a NaN-filled block of the output's size for the allocator to hand out.
                    poison = torch.full_like(st["scores"], float("nan"))
                    del poison
            self._sync()
            t0 = time.perf_counter()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                out = call(st)
                self._sync()
            first = time.perf_counter() - t0
            if name == "tp_softmax":
                for w in caught:
                    if "PyTorch path" in str(w.message) and not row["path"].startswith("torch"):
                        row["path"] = "torch: " + str(w.message).split("because: ", 1)[-1]
            if name == "compile":
                row["note"] = f"compiled in {first:.1f} s"
            elif first > 1.0:
                row["note"] = f"first call {first:.1f} s"
            if name != "copy":
                chk = bl.check_output(out, problem)
                row.update(err=chk.err, masked_rows=chk.masked_rows, nan_rows=chk.nan_rows,
                           sum_err=chk.sum_err)
            del out, st
        except Unavailable as exc:
            row["status"], call = str(exc), None
        except Exception as exc:  # noqa: BLE001 - one failing contender must not end the run
            row["status"], call = _brief("error", exc), None
            self._recover()
        if concurrent:
            self.dist.barrier()
        if call is None:
            return row
        sets = problem.sets
        try:
            timing = self.timer.time(lambda k: call(sets[k]), len(sets))
        except Exception as exc:  # noqa: BLE001
            row["status"] = _brief("error", exc)
            self._recover()
            return row
        row.update(ms=timing.ms, reps=timing.reps, host_us=timing.host_us, spread=timing.spread,
                   ms_per_rank=f"{timing.ms:.5g}")
        row["gbps"] = 2 * problem.scores_bytes / (timing.ms * 1e-3) / 1e9
        row["efficiency"] = row["floor_ms"] / timing.ms
        if name == "copy":
            row["floor_copy_ms"] = self._floor_copy_ms(problem)
        own = None
        if name == "tp_softmax":
            row_bytes = problem.case.K * problem.sets[0]["scores"].element_size()
            own = own_floor_bytes(row["path"], problem.floor, row_bytes)
        if own is not None:
            row["own_efficiency"] = own / self.copy_bw * 1e3 / timing.ms
        return row

    def _floor_copy_ms(self, problem: bl.Problem) -> float:
        """Median ms of a device copy of the problem's floor bytes (half read, half written), over
        as many rotating buffer pairs as the problem has input sets; NaN if it cannot be had."""
        try:
            return bl.copy_ms(self.timer, self.device, (problem.floor.total // 2 + 15) // 16 * 16,
                              len(problem.sets))
        except Exception:  # noqa: BLE001 - a missing bound must not end the run
            self._recover()
            return float("nan")

    def _recover(self):
        if self.device.type == "cuda":
            try:
                torch.cuda.synchronize(self.device)
                torch.cuda.empty_cache()
            except Exception:  # noqa: BLE001 - a lost context shows up in the next rows
                pass

    def run_job(self, case: bl.Case, shard: bl.Shard, vrank: int, contenders, concurrent: bool,
                seed: int):
        """Generate one rank's inputs and time every contender on them."""
        if not contenders:
            return []
        dtype = case.torch_dtype
        itemsize = torch.empty((), dtype=dtype).element_size()
        local = replace(case, H=shard.heads)
        per_set = (2 * case.B * shard.heads * case.Q * case.K * itemsize
                   + sum(bl.needed_elements(s, case.Q, case.K, case.causal, case.window) * n
                         for s, n in bl.operand_shapes(local, dtype)))
        n_sets = 2 if self.args.smoke else bl.sets_for_cache(per_set, self.l2)
        try:
            problem = bl.make_problem(case, shard, self.device, seed=bl.case_seed(seed, case.name, vrank),
                                      n_sets=n_sets, n_sample=self.args.rows)
        except Exception as exc:  # noqa: BLE001
            self._recover()
            rows = []
            for name in contenders:
                rows.append({**{k: "" for k in CSV_COLUMNS}, "case": case.name, "contender": name,
                             "status": _brief("error: inputs", exc),
                             "dtype": case.dtype, "B": case.B, "H_local": shard.heads, "H_total": case.H_total,
                             "mp": case.mp, "head_offset": shard.head_offset, "Q": case.Q, "K": case.K,
                             "flags": case.flags, "ranks": 1, "slowest_rank": vrank, "ms": float("nan")})
                if concurrent:
                    self.dist.barrier()
            return rows
        rows = []
        for name in contenders:
            rows.append(self.run_contender(name, problem, vrank, concurrent))
            for st in problem.sets:
                st.pop("copy_dst", None)
        del problem
        self._recover()
        return rows


# ----------------------------------------------------------------------------------------------
# Plans: which shards run where
# ----------------------------------------------------------------------------------------------

def plan(case: bl.Case, world: int, contenders):
    """Steps of one case: ``(case_to_run, {rank: [(vrank, shard)]}, contenders, concurrent)``."""
    if not case.scaling:
        if world == 1:
            s = case.mp - 1
            return [(case, {0: [(s, bl.Shard(s, s * case.H, case.H))]}, contenders, False)]
        shards = {}
        for r in range(world):
            off, cnt = head_partition(case.H_total, case.mp, r % case.mp)
            shards[r] = [(r, bl.Shard(r, off, cnt))]
        return [(case, shards, contenders, True)]
    timed = [c for c in contenders if c in ("copy", "tp_softmax")]
    full = replace(case, name=case.name + "@1rank", H=case.H_total, mp=1, scaling=False)
    steps = [(full, {0: [(0, bl.Shard(0, 0, case.H_total))]}, timed, False)]
    n = world if world > 1 else case.mp
    shard_case = replace(case, H=case.H_total // n, mp=n) if case.H_total % n == 0 else case
    parts = [bl.Shard(r, *head_partition(case.H_total, n, r)) for r in range(n)]
    if world == 1:
        steps.append((shard_case, {0: [(r, parts[r]) for r in range(n)]}, timed, False))
    else:
        steps.append((shard_case, {r: [(r, parts[r])] for r in range(n)}, timed, True))
    return steps


def aggregate(rows):
    """One row per (case, contender): the slowest rank's, with every rank's time listed."""
    groups = {}
    for r in rows:
        groups.setdefault((r["case"], r["contender"]), []).append(r)
    out = []
    for (_, _), rs in groups.items():
        timed = [r for r in rs if r["status"] == "ok" and not math.isnan(r["ms"])]
        bad = [r for r in rs if r["status"] != "ok"]
        pick = max(timed, key=lambda r: r["ms"]) if timed else rs[0]
        row = dict(pick)
        row["ranks"] = len(rs)
        row["ms_per_rank"] = ";".join(f"{r['ms']:.5g}" for r in sorted(rs, key=lambda r: r["slowest_rank"])) \
            if timed else ""
        if bad:
            same = len(bad) == len(rs) and len({r["status"] for r in bad}) == 1
            row["status"] = bad[0]["status"] if same else f"{bad[0]['status']} (rank {bad[0]['slowest_rank']})"
        errs = [r["err"] for r in rs if isinstance(r["err"], float)]
        if errs:
            row["err"] = float("nan") if any(math.isnan(e) for e in errs) and timed else max(
                (e for e in errs if not math.isnan(e)), default=float("nan"))
        nans = [r["nan_rows"] for r in rs if isinstance(r["nan_rows"], int)]
        if nans:
            row["nan_rows"] = sum(nans)
        order = {"NaN": 3, "nonzero": 2, "zeros": 1, "": 0}
        row["masked_rows"] = max((r["masked_rows"] for r in rs), key=lambda m: order.get(m, 0))
        out.append(row)
    return out


def add_speedups(rows):
    tp = {r["case"]: r["ms"] for r in rows if r["contender"] == "tp_softmax" and r["status"] == "ok"}
    for r in rows:
        t = tp.get(r["case"])
        if t and r["status"] == "ok" and not math.isnan(r["ms"]):
            r["speedup"] = r["ms"] / t
    for r in rows:
        if r["contender"] != "tp_softmax" or "@1rank" in r["case"]:
            continue
        full = tp.get(r["case"] + "@1rank")
        if full and r["status"] == "ok":
            ratio = r["ms"] / (full / r["ranks"])
            r["scaling"] = f"{ratio:.3f}"
            r["note"] = (f"slowest of {r['ranks']} ranks vs 1/{r['ranks']} of the unsharded "
                         f"{full:.4g} ms: {ratio:.3f}").strip()


# ----------------------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------------------

def _f(x, fmt):
    """Format a number; "-" (right-aligned to the format's width) when there is none."""
    if isinstance(x, (int, float)) and not (isinstance(x, float) and math.isnan(x)):
        return format(x, fmt)
    width = re.match(r"\d*", fmt).group(0)
    return "-".rjust(int(width) if width else 1)


def _short(status: str) -> str:
    for prefix, short in (("not available", "n/a"), ("not supported", "n/s"), ("refuses", "refuses"),
                          ("not run", "not run"), ("error", "error")):
        if status.startswith(prefix):
            return short
    return status[:8]


def _err(r):
    e = r["err"]
    if not isinstance(e, float):
        return "-"
    if math.isnan(e):
        return "NaN" if r["status"] == "ok" and r["contender"] != "copy" else "-"
    text = f"{e:.1e}"
    if e > bl.WRONG:
        text += " WRONG"
    return text


def print_table(rows, out=sys.stdout):
    head = (f"{'case':<24} {'contender':<10} {'ms':>9} {'GB/s':>7} {'eff':>5} {'tp x':>6} "
            f"{'err':>13} {'blind':>7} {'sum_err':>8}  status / path")
    print(head, file=out)
    print("-" * len(head), file=out)
    last = None
    for r in rows:
        if last is not None and r["case"] != last:
            print("", file=out)
        last = r["case"]
        status = r["status"] if r["status"] != "ok" else (r["path"] or "ok")
        if r["note"]:
            status += f"  [{r['note']}]"
        if r["nan_rows"] not in ("", 0):
            status += f"  ({r['nan_rows']} rows NaN)"
        print(f"{r['case']:<24} {r['contender']:<10} {_f(r['ms'], '9.4f')} {_f(r['gbps'], '7.0f')} "
              f"{_f(r['efficiency'], '5.2f')} {_f(r['speedup'], '6.2f')} {_err(r):>13} "
              f"{r['masked_rows'] or '-':>7} {_f(r['sum_err'], '8.1e')}  {status}", file=out)


SPEEDUP_GOALS = (("compile", 1.5), ("deepspeed", 2.0))  # tp_softmax's speed-up over each


LONG_ROW_BYTES = 16 * 32 * 1024  # rows beyond this many bytes of scores are held to their own floor


def own_floor_bytes(path: str, floor: bl.FloorBytes, row_bytes: int = 0):
    """The bytes of a row's own floor where its target is 0.60 of that floor, else None: rows longer
    than 16 slices of 32 KiB (``row_bytes`` of scores, or the long-row / two-read path). The
    two-read path reads the visible scores twice; the paths that read a row once (the long-row
    kernel, or from kernel v27 a cluster of 16 wide blocks) have the floor itself."""
    if "two reads" in path:
        return floor.total + floor.scores_read
    if "long rows" in path or row_bytes > LONG_ROW_BYTES:
        return floor.total
    return None


def eff_goal(tp_row) -> float:
    """The efficiency target of a case: 0.80 for decode (Q == 1), 0.90 for prefill."""
    return 0.80 if tp_row["Q"] == 1 else 0.90


def _num(x) -> float:
    """A CSV cell or a row value as a float (NaN when it is none)."""
    try:
        return float(x)
    except (TypeError, ValueError):
        return float("nan")


def floor_copy_eff(copy_row) -> float:
    """The efficiency of the device copy of the case's floor bytes (NaN when it was not timed)."""
    if copy_row is None:
        return float("nan")
    fc, fm = _num(copy_row.get("floor_copy_ms")), _num(copy_row.get("floor_ms"))
    return fm / fc if fc > 0 and fm > 0 else float("nan")


def targets(case_rows):
    """The goals for tp_softmax on one case; returns the misses (empty: all met)."""
    by = {r["contender"]: r for r in case_rows}
    tp = by.get("tp_softmax")
    if tp is None or tp["status"] != "ok":
        return ["tp_softmax did not run"]
    miss = []
    if tp.get("own_efficiency", "") not in ("", None):
        # Rows longer than 16 slices of 32 KiB: against their own floor.
        if not tp["own_efficiency"] >= 0.6:
            miss.append("own eff<0.60")
    else:
        goal = eff_goal(tp)
        if not tp["efficiency"] >= goal:
            miss.append(f"eff<{goal:.2f}")
    for name, want in SPEEDUP_GOALS:
        r = by.get(name)
        if r is not None and r["status"] == "ok" and not r["speedup"] >= want:
            miss.append(f"{name}<{want:g}x")
    tol = bl.TOLERANCE[tp["dtype"]]
    if not (isinstance(tp["err"], float) and tp["err"] <= tol):
        miss.append(f"err>{tol:g}")
    if tp["masked_rows"] not in ("", "zeros") or tp["nan_rows"] not in ("", 0):
        miss.append("blind rows")
    if tp["scaling"] and float(tp["scaling"]) > 1.10:
        miss.append("scaling>1.10")
    return miss


def beyond_copy(case_rows):
    """The targets of one case that would need tp_softmax to take less time than the device copy
    of the case's floor bytes took in the same run: ``{target: ms it needs}`` (labels as in
    ``targets``). Empty when that copy was not timed."""
    by = {r["contender"]: r for r in case_rows}
    tp, cp = by.get("tp_softmax"), by.get("copy")
    if tp is None or cp is None or tp["status"] != "ok":
        return {}
    bound = _num(cp.get("floor_copy_ms"))
    if not bound > 0:
        return {}
    need = {}
    if tp.get("own_efficiency", "") in ("", None):
        goal = eff_goal(tp)
        need[f"eff<{goal:.2f}"] = tp["floor_ms"] / goal
    for name, want in SPEEDUP_GOALS:
        r = by.get(name)
        if r is not None and r["status"] == "ok" and not math.isnan(r["ms"]):
            need[f"{name}<{want:g}x"] = r["ms"] / want
    return {k: v for k, v in need.items() if v < bound}


def print_summary(rows, out=sys.stdout):
    print("summary: tp_softmax per case (x NAME = tp_softmax's speed-up over NAME; "
          "targets: eff >= 0.90 prefill / 0.80 decode, rows beyond 16 x 32 KiB >= 0.60 of their own floor, "
          + ", ".join(f">= {want:g}x {name}" for name, want in SPEEDUP_GOALS)
          + "; copy = the efficiency of a device copy of the floor's bytes)",
          file=out)
    head = (f"{'case':<24} {'path':<7} {'ms':>9} {'eff':>5} {'copy':>5} {'x compile':>9} {'x deepspeed':>11} "
            f"{'x eager':>7} {'err':>8}  targets")
    print(head, file=out)
    print("-" * len(head), file=out)
    cases = []
    for r in rows:
        if r["case"] not in cases:
            cases.append(r["case"])
    scaling, bounds = [], []
    for c in cases:
        cr = [r for r in rows if r["case"] == c]
        by = {r["contender"]: r for r in cr}
        tp = by.get("tp_softmax")
        if tp is None:
            continue

        def x(name):
            r = by.get(name)
            if r is None:
                return "-"
            if r["status"] != "ok":
                return _short(r["status"])
            return _f(r["speedup"], ".2f")

        path = "-" if tp["status"] != "ok" else (tp["path"].split(" ")[0].rstrip(":") if tp["path"] else "?")
        path = path if path in ("kernel", "torch") else "?"
        miss = targets(cr)
        beyond = beyond_copy(cr)
        for m in [m for m in miss if m in beyond]:
            bounds.append(f"  {c}: {m} needs <= {beyond[m]:.4f} ms; "
                          f"the copy of the floor's bytes took {by['copy']['floor_copy_ms']:.4f} ms")
        miss = [m + "*" if m in beyond else m for m in miss]
        copy_eff = floor_copy_eff(by.get("copy"))
        own = tp.get("own_efficiency", "")
        reads = "two reads" if "two reads" in tp["path"] else "one read"
        own_text = f" (own floor, {reads}: {own:.2f})" if own not in ("", None) else ""
        print(f"{c:<24} {path:<7} {_f(tp['ms'], '9.4f')} {_f(tp['efficiency'], '5.2f')} {_f(copy_eff, '5.2f')} "
              f"{x('compile'):>9} {x('deepspeed'):>11} {x('eager'):>7} {_err(tp):>8}  "
              f"{'ok' if not miss else 'MISS ' + ', '.join(miss)}{own_text}", file=out)
        if tp["scaling"]:
            scaling.append(f"  {c}: {tp['note']} (target <= 1.10)")
    for line in scaling:
        print(line, file=out)
    if bounds:
        print("  * beyond the copy: the target needs less time than a device copy of the case's floor "
              "bytes took in this run (column copy: that copy's efficiency)", file=out)
    for line in bounds:
        print(line, file=out)
    notes = {}
    for r in rows:
        if r["status"] != "ok" and r["contender"] != "tp_softmax":
            notes.setdefault((r["contender"], r["status"]), []).append(r["case"])
    for (name, status), where in notes.items():
        cases_text = "all cases" if len(where) == len(cases) else ", ".join(where)
        print(f"  {name}: {status} [{cases_text}]", file=out)


def write_csv(rows, path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
    tmp.replace(path)


def draw_chart(rows, path: Path, title: str):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no chart"
    cases = []
    for r in rows:
        if r["case"] not in cases:
            cases.append(r["case"])
    names = [c for c in bl.CONTENDERS if any(r["contender"] == c for r in rows)]
    width = 0.8 / max(1, len(names))
    fig, ax = plt.subplots(figsize=(max(8, 1.1 * len(cases) + 2), 4.8))
    any_wrong = False
    for k, name in enumerate(names):
        eff, wrong = [], []
        for c in cases:
            r = next((r for r in rows if r["case"] == c and r["contender"] == name), None)
            eff.append(r["efficiency"] if r is not None and r["status"] == "ok" else 0.0)
            err = r["err"] if r is not None else float("nan")
            wrong.append(isinstance(err, float) and err > bl.WRONG)
        xs = [i + (k - (len(names) - 1) / 2) * width for i in range(len(cases))]
        bars = ax.bar(xs, eff, width, label=name)
        for bar, bad in zip(bars, wrong):
            if bad:  # a fast wrong answer: hatched and labelled, so the bar is not read as a result
                any_wrong = True
                bar.set_hatch("xx")
                bar.set_alpha(0.45)
                ax.text(bar.get_x() + bar.get_width() / 2, bar.get_height() + 0.01, "wrong", rotation=90,
                        ha="center", va="bottom", fontsize=6)
    # Per case, a black bar: the efficiency of the device copy of the case's floor bytes.
    marks = []
    for i, c in enumerate(cases):
        e = floor_copy_eff(next((r for r in rows if r["case"] == c and r["contender"] == "copy"), None))
        if e == e:
            marks.append((i, e))
    if marks:
        ax.scatter([i for i, _ in marks], [e for _, e in marks], marker="_", s=500, linewidths=2,
                   color="black", zorder=3, label="copy of the floor's bytes")
    top = max([r["efficiency"] for r in rows if r["status"] == "ok" and r["efficiency"] == r["efficiency"]]
              + [e for _, e in marks] or [1.0])
    ax.set_ylim(0, min(max(1.1, 1.05 * top), 2.0) + 0.2)  # headroom for the legend
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.axhline(0.9, color="grey", linewidth=0.8, linestyle="--")
    ax.set_xticks(range(len(cases)))
    ax.set_xticklabels(cases, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("efficiency = floor time / measured time")
    if any_wrong:
        title += f"\nhatched: wrong result (max error vs float64 > {bl.WRONG:g})"
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8, ncol=len(names) + (1 if marks else 0), loc="upper center")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return f"chart: {path}"


def chart_from_csv(csv_path: Path, out_dir: Path) -> str:
    """Redraw the efficiency chart of an earlier run from its bench.csv (and bench_env.json)."""
    rows = []
    with open(csv_path, newline="") as fh:
        for r in csv.DictReader(fh):
            for key in ("efficiency", "err"):
                try:
                    r[key] = float(r[key])
                except (TypeError, ValueError):
                    r[key] = float("nan")
            rows.append(r)
    # bench_env.json beside bench.csv, or NAME_env.json beside NAME.csv (as in docs/)
    env_path = next((p for p in (csv_path.with_name(csv_path.stem + "_env.json"), csv_path.with_name("bench_env.json"))
                     if p.is_file()), None)
    title = csv_path.name
    if env_path is not None:
        env = json.loads(env_path.read_text())
        bw = env.get("copy_bandwidth_GBps")
        title = (f"{env.get('device', '?')}, torch {env.get('torch', '?')}"
                 + (f", copy {float(bw):.0f} GB/s" if bw else "") + f", {env.get('date', '?')}")
    return draw_chart(rows, out_dir / "bench_efficiency.png", title)


def git_commit(root: Path = ROOT) -> str:
    """The checkout's commit, with ``+changes`` when tracked files differ from it (the numbers then
    belong to code that is not that commit)."""
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10).stdout.strip()
        if not head:
            return "?"
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return head + ("+changes" if dirty else "")
    except Exception:  # noqa: BLE001
        return "?"


# ----------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--out", default="bench_out", help="folder for bench.csv, bench_env.json and the chart")
    p.add_argument("--only", action="append", default=[], metavar="NAME",
                   help="run only these named cases (names or shell patterns, comma-separated, "
                        "repeatable); cases given with --case always run")
    p.add_argument("--case", action="append", default=[], metavar="SPEC",
                   help="add a case: [NAME=]B,H,mp,Q,K,dtype[,flags] (flags: causal+alibi+slopes+pad+"
                        "boolpad+window=N+scale=F+scaling; boolpad: the padding as a bool mask)")
    p.add_argument("--contenders", default=",".join(bl.CONTENDERS),
                   help=f"comma-separated subset of {','.join(bl.CONTENDERS)}")
    p.add_argument("--list", action="store_true", help="print the cases and exit")
    p.add_argument("--chart-from", metavar="CSV", default=None,
                   help="draw OUT/bench_efficiency.png from an earlier run's CSV (bench_env.json or "
                        "NAME_env.json beside NAME.csv gives the title) and exit; needs no GPU")
    p.add_argument("--smoke", action="store_true",
                   help="tiny shapes and few repetitions: checks the code path, measures nothing")
    p.add_argument("--device", choices=("cuda", "cpu"), default=None, help="default: cuda when available")
    p.add_argument("--timer", choices=("events", "triton"), default="events",
                   help="events: CUDA events per repetition, back to back (default); "
                        "triton: triton.testing.do_bench (clears the L2 before each repetition)")
    p.add_argument("--warmup-ms", type=float, default=25.0)
    p.add_argument("--rep-ms", type=float, default=200.0, help="time spent repeating each contender")
    p.add_argument("--rows", type=int, default=64, help="rows sampled for the float64 reference")
    p.add_argument("--seed", type=int, default=None, help="input seed (default: from the clock, printed)")
    p.add_argument("--compile-backend", default=None, help="torch.compile backend (default inductor; "
                   "aot_eager with --smoke)")
    p.add_argument("--deepspeed-build-timeout", type=float, default=900.0,
                   help="seconds allowed for building DeepSpeed's inference kernels")
    args = p.parse_args(argv)
    args.contenders = [c.strip() for c in args.contenders.split(",") if c.strip()]
    unknown = [c for c in args.contenders if c not in bl.CONTENDERS]
    if unknown:
        p.error(f"unknown contender(s) {unknown}; choose from {list(bl.CONTENDERS)}")
    args.only = [n.strip() for item in args.only for n in item.split(",") if n.strip()]
    if args.compile_backend is None:
        args.compile_backend = "aot_eager" if args.smoke else "inductor"
    if args.seed is None:
        args.seed = int(time.time()) % 100000
    try:
        custom = [bl.parse_case(s) for s in args.case]
    except ValueError as exc:
        p.error(str(exc))
    named = list(bl.PUBLIC_CASES) + list(bl.EXTRA_CASES)
    known = named + custom
    args.known = known
    if args.only:
        cases = [c for c in named if any(fnmatch.fnmatchcase(c.name, pat) for pat in args.only)]
        missing = [pat for pat in args.only if not any(fnmatch.fnmatchcase(c.name, pat) for c in known)]
        if missing:
            p.error(f"--only: no case matches {missing}; --list shows the cases")
        cases += custom  # given on the command line: always run
    else:
        cases = list(bl.PUBLIC_CASES) + custom
    if args.smoke:
        cases = [bl.smoke_case(c) for c in cases]
    args.cases = cases
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.chart_from:
        print(chart_from_csv(Path(args.chart_from), Path(args.out)))
        return 0
    if args.list:
        print(f"{'case':<24} {'dtype':<5} {'B,H_local,mp,Q,K':<24} flags   (* = selected)")
        chosen = {c.name for c in args.cases}
        for c in args.known:
            mark = "*" if c.name in chosen else " "
            print(f"{mark}{c.name:<23} {c.dtype:<5} {c.shape_text():<24} {c.flags}")
        return 0
    dist = Dist(timeout_s=max(1800.0, args.deepspeed_build_timeout + 1200.0))
    try:
        return run(args, dist)
    finally:
        dist.close()


def run(args, dist: Dist) -> int:
    out_dir = Path(args.out)
    lead = dist.rank == 0
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: no CUDA device is visible")
        device = torch.device("cuda", dist.local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    # DeepSpeed runs on the cases that are not scaling checks.
    ds_wanted = "deepspeed" in args.contenders and any(not c.scaling for c in args.cases)
    ds_build = DeepSpeedBuild(ds_wanted, device, dist, args.deepspeed_build_timeout,
                              out_dir / "deepspeed_build.log")

    if device.type == "cpu":
        timer = bl.CpuTimer(warmup=1, reps=3 if args.smoke else 20)
    elif args.timer == "triton":
        timer = bl.TritonTimer(args.warmup_ms, args.rep_ms)
    else:
        timer = bl.CudaEventTimer(device, warmup_ms=2.0 if args.smoke else args.warmup_ms,
                                  rep_ms=5.0 if args.smoke else args.rep_ms)
    copy_bytes = (8 << 20) if (args.smoke or device.type == "cpu") else (512 << 20)
    copy_bw = bl.copy_bandwidth(timer, device, copy_bytes)
    all_bw = dist.gather(copy_bw)

    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "cuda": torch.version.cuda, "tp_softmax": tp_softmax.__version__,
        "git": git_commit(), "world_size": dist.world, "timer": timer.name, "seed": args.seed,
        "copy_bandwidth_GBps": copy_bw / 1e9, "copy_buffer_bytes": 2 * copy_bytes,
        "smoke": args.smoke, "compile_backend": args.compile_backend,
        "command": " ".join([os.path.basename(sys.argv[0])] + sys.argv[1:]),
    }
    if lead:
        bws = ", ".join(f"{b / 1e9:.1f}" for b in all_bw)
        print(f"tp_softmax benchmark  {env['date']}  ({env['command']})")
        print(f"device: {env['device']} x {dist.world} process(es) | torch {env['torch']} (CUDA {env['cuda']}) | "
              f"tp_softmax {env['tp_softmax']} (git {env['git']})")
        print(f"copy bandwidth: {copy_bw / 1e9:.1f} GB/s (bytes read + written, {2 * copy_bytes >> 20} MiB a copy"
              f"{'; per rank: ' + bws if dist.world > 1 else ''}) | timer: {timer.name}, median | seed {args.seed}"
              f"{' | SMOKE: tiny shapes, numbers mean nothing' if args.smoke else ''}")
        sys.stdout.flush()

    runner = Runner(args, device, dist, timer, copy_bw)
    results = []

    def run_cases(contenders):
        for case in args.cases:
            for run_case, shards, names, concurrent in plan(case, dist.world, contenders):
                mine = []
                for vrank, shard in shards.get(dist.rank, []):
                    mine += runner.run_job(run_case, shard, vrank, names, concurrent, args.seed)
                gathered = dist.gather(mine)
                if lead:
                    rows = aggregate([r for part in gathered for r in part])
                    results.extend(rows)
                    write_csv(results, out_dir / "bench.csv")
                    for r in rows:
                        ms = _f(r["ms"], ".4f")
                        state = r["status"] if r["status"] != "ok" else f"{ms} ms, eff {_f(r['efficiency'], '.2f')}"
                        print(f"  {r['case']:<24} {r['contender']:<10} {state}")
                    sys.stdout.flush()

    run_cases([c for c in args.contenders if c != "deepspeed"])
    if ds_wanted:
        runner.ds_module, runner.ds_status = ds_build.finish()
        if lead:
            print(f"deepspeed: {runner.ds_status}")
        run_cases(["deepspeed"])

    if not lead:
        return 0
    order = {name: k for k, name in enumerate(bl.CONTENDERS)}
    case_order = {}
    for r in results:
        case_order.setdefault(r["case"], len(case_order))
    results.sort(key=lambda r: (case_order[r["case"]], order[r["contender"]]))
    add_speedups(results)
    write_csv(results, out_dir / "bench.csv")
    env["deepspeed"] = runner.ds_status
    (out_dir / "bench_env.json").write_text(json.dumps(env, indent=1) + "\n")
    chart = draw_chart(results, out_dir / "bench_efficiency.png",
                       f"{env['device']}, torch {env['torch']}, copy {copy_bw / 1e9:.0f} GB/s, {env['date']}")
    print("")
    print_table(results)
    print("")
    print(f"csv: {out_dir / 'bench.csv'} | {chart}")
    print("")
    print_summary(results)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # teardown
    from teardown import exit_now

    exit_now(main())  # under torchrun, once main has destroyed the group (Dist.close)
