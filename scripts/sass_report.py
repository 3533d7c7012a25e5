"""Disassemble the built extension and check the one-read kernel's machine code.

    python scripts/sass_report.py [BUILD_DIR]     (default: $TP_SOFTMAX_BUILD_DIR)

For every kernel variant: local-memory instructions (LDL/STL, spills), bulk copies (UBLKCP),
16-byte shared loads (LDS.128) and 16-byte global stores (STG.E...128). Fails when an aligned
variant of the staged kernel, or a staged variant of the long-row kernel, has no bulk copy, no
16-byte shared loads or stores, or more than 4 local-memory instructions (the allowed exception of
scripts/check_kernels.py: values reloaded once per tile).
"""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

FUNC = re.compile(r"Function : (\S+)")
sys.path.insert(0, str(Path(__file__).resolve().parent))
from check_kernels import NAME  # noqa: E402  (mangled names: kind, dtype, mask, bias, chunks, aligned, cluster)

DTYPES = {"6__half": "fp16", "13__nv_bfloat16": "bf16", "f": "fp32"}


def main() -> int:
    root = Path(sys.argv[1] if len(sys.argv) > 1 else os.environ.get("TP_SOFTMAX_BUILD_DIR", "."))
    libs = sorted(root.rglob("tp_softmax_cuda*.so"))
    if not libs or shutil.which("cuobjdump") is None:
        print(f"sass_report: no built extension under {root} or no cuobjdump")
        return 2
    sass = subprocess.run(["cuobjdump", "-sass", str(libs[0])], capture_output=True, text=True).stdout
    parts = FUNC.split(sass)
    failures, rows = [], []
    for name, body in zip(parts[1::2], parts[2::2]):
        m = NAME.search(name)
        if not m:
            continue
        kind, dt, mask, bias, _chunks, aligned, last = m.groups()
        aligned = aligned == "1"
        checked = aligned and (kind == "staged" or last == "1")  # long rows: the staged variants
        ops = [ln.split(";")[0] for ln in body.splitlines() if "/*" in ln]
        count = lambda pat: sum(1 for o in ops if re.search(pat, o))
        local = count(r"\b(LDL|STL)\b")
        bulk = count(r"UBLKCP")
        lds128 = count(r"\bLDS\.128\b")
        stg128 = count(r"\bSTG\.E[.A-Z0-9]*\.128\b")
        rows.append((kind, DTYPES.get(dt, dt), mask, bias, int(aligned), local, bulk, lds128, stg128, checked))
        if checked:
            if bulk == 0 or stg128 == 0 or lds128 == 0:
                failures.append(f"{name}: bulk copies {bulk}, LDS.128 {lds128}, STG.128 {stg128}")
            if local > 4:
                failures.append(f"{name}: {local} local-memory instructions")
    print(f"{'kernel':10} {'dtype':5} {'mask':>4} {'bias':>4} {'aligned':>7} {'LDL/STL':>7} {'UBLKCP':>6} "
          f"{'LDS.128':>7} {'STG.128':>7} {'checked':>7}")
    for r in sorted(rows):
        print(f"{r[0]:10} {r[1]:5} {r[2]:>4} {r[3]:>4} {r[4]:>7} {r[5]:>7} {r[6]:>6} {r[7]:>7} {r[8]:>7} {int(r[9]):>7}")
    hot = [r for r in rows if r[9]]
    print(f"sass_report: {len(rows)} kernels, {len(hot)} aligned staged (long rows included); "
          f"local-memory instructions in them: {sum(r[5] for r in hot)}")
    for f in failures:
        print("FAIL", f)
    return 1 if failures or not hot else 0


if __name__ == "__main__":
    sys.exit(main())
