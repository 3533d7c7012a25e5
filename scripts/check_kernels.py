"""Compile the CUDA kernels with plain nvcc (no torch) and check the compiler's resource report.

    python scripts/check_kernels.py [--arch sm_90] [--jobs 2]

Fails when a file does not compile (scripts/timeline_probe.cu included, with the kernels' timeline
hooks on, and scripts/pattern_probe.cu), or when a hot variant spills registers or uses a stack
frame beyond 8 bytes. Hot variants: the one-read (staged) kernel with 16-byte aligned rows, which
every contiguous tensor with K a multiple of the vector width takes, with and without a cluster,
and the long-row kernel's staged variants (its last template flag; rows of more than 16 x 32 KiB).
The allowed exception is reported: at most 8 bytes of stack (one or two values stored before the
tile loop and reloaded once per tile, outside the chunk loops: at present the 16-bit rows with an
additive mask, 16-bit or float32, and alibi slopes, 8 chunks a thread, without a cluster). The
strided/unaligned variants and the long-row kernel's two-read variants are reported but allowed
to spill.
"""

import argparse
import concurrent.futures
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
KERNELS = ROOT / "csrc" / "kernels"
ENTRY = re.compile(
    r"Function properties for (\S+)\n\s+(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads\n"
    r"ptxas info\s+: Used (\d+) registers")
NAME = re.compile(r"(staged|streaming)_softmax_kernelI(\w+?)LNS_8MaskKindE(\d)ELNS_8BiasKindE(\d)E(?:Li(\d)E)?"
                  r"(?:Lb(\d)E)?(?:Lb(\d)E)?")  # kind, dtype, mask, bias, chunks, aligned, cluster / staged


# The timeline probe (scripts/timeline_probe.cu) builds the kernels with their timeline hooks on;
# compiled here too (its resource report is not checked) so that the hooks keep compiling.
PROBE = ROOT / "scripts" / "timeline_probe.cu"
PROBE_FLAGS = ("-DTP_SOFTMAX_TIMELINE", "-DTP_SOFTMAX_PLAIN_ROWS_ONLY", f"-I{KERNELS}")
# The pattern probe (scripts/pattern_probe.cu, the data movement of a case without arithmetic)
# uses the kernels' bulk-copy helpers; compiled here so that it keeps compiling.
PATTERN = ROOT / "scripts" / "pattern_probe.cu"


def compile_one(src: Path, arch: str, out_dir: Path, extra=()):
    cmd = ["nvcc", "-std=c++17", f"-arch={arch}", "-O3", "-Xptxas", "-v", *extra, "-c", str(src),
           "-o", str(out_dir / (src.stem + ".o"))]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    return src.name, proc.returncode, proc.stdout + proc.stderr


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="sm_90")
    ap.add_argument("--jobs", type=int, default=2)
    args = ap.parse_args()
    if shutil.which("nvcc") is None:
        print("check_kernels: nvcc not found")
        return 2
    failures, rows = [], []
    with tempfile.TemporaryDirectory() as tmp, concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
        probe = pool.submit(compile_one, PROBE, args.arch, Path(tmp), PROBE_FLAGS)
        pattern = pool.submit(compile_one, PATTERN, args.arch, Path(tmp), (f"-I{KERNELS}",))
        results = pool.map(lambda s: compile_one(s, args.arch, Path(tmp)), sorted(KERNELS.glob("*.cu")))
        for name, rc, log in results:
            if rc != 0:
                failures.append(f"{name}: nvcc exit {rc}\n{log[-3000:]}")
                continue
            for fn, stack, spill_st, spill_ld, regs in ENTRY.findall(log):
                m = NAME.search(fn)
                if not m:
                    continue
                kind, dtype, mask, bias, chunks, aligned, last = m.groups()
                chunks = chunks or "0"
                aligned = aligned or "0"
                flag = "cluster" if kind == "staged" else "staged"  # the last template flag
                hot = aligned == "1" and (kind == "staged" or last == "1")
                if hot and (int(stack) or int(spill_st)):
                    print(f"  note: hot variant {kind} {dtype} mask={mask} bias={bias} {flag}={last}: "
                          f"{stack} B stack, {spill_st} B spill stores")
                bad = int(stack) > 8 or int(spill_st) > 8
                rows.append((name, dtype, mask, bias, chunks, aligned, int(regs), int(stack), int(spill_st), hot))
                if hot and bad:
                    failures.append(f"{name}: hot variant {fn} spills ({stack} B stack, {spill_st} B spill stores)")
        name, rc, log = probe.result()
        if rc != 0:
            failures.append(f"{name} (timeline hooks on): nvcc exit {rc}\n{log[-3000:]}")
        else:
            print(f"check_kernels: {name} compiles with the timeline hooks on")
        name, rc, log = pattern.result()
        if rc != 0:
            failures.append(f"{name}: nvcc exit {rc}\n{log[-3000:]}")
        else:
            print(f"check_kernels: {name} compiles")
    n_hot = sum(r[-1] for r in rows)
    n_spill = sum(1 for r in rows if (r[7] or r[8]) and not r[-1])
    print(f"check_kernels: {len(rows)} kernel variants compiled for {args.arch}, {n_hot} hot; "
          f"{n_spill} non-hot variants with a stack frame or spills (allowed)")
    by_chunks = {}
    for r in rows:
        key = (r[1][:12], r[4], r[5])
        lo, hi = by_chunks.get(key, (999, 0))
        by_chunks[key] = (min(lo, r[6]), max(hi, r[6]))
    for (dt, ch, al), (lo, hi) in sorted(by_chunks.items()):
        print(f"  {dt:12s} chunks={ch:2s} aligned={al}: {lo}-{hi} registers")
    for f in failures:
        print("FAIL", f)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
