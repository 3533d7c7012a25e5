#!/usr/bin/env bash
# A/B timing of kernel variants in one GPU call, each against the copy baseline of the same run.
#
#   scripts/ab_bench.sh --make NAME [REV]   (no GPU) copy tp_softmax/ and csrc/ of the working
#                                           tree, or of git revision REV, to .ab/NAME
#   scripts/ab_bench.sh NAME...             (GPU) build every .ab/NAME in parallel, then time them
#                                           one after the other with `launch/bench.py --contenders
#                                           copy,tp_softmax`; a table of ms / efficiency last
#
#   OUT=dir            where logs, CSVs and the table go (default /tmp/ab_out)
#   BENCH_ARGS="..."   passed to launch/bench.py (e.g. --only 'bloom*,bert*' --case ...)
#   AB_CHECK="NAME..." also run the GPU tests and compute-sanitizer on these variants
#
# .ab/ is ignored by git: copy it to the GPU machine along with the working tree. Each
# variant builds into its own folder (/tmp/ab_build_NAME); its tests, sanitizer runs and bench go
# through scripts/gpu_check.sh with TP_SOFTMAX_PKG=.ab/NAME, so they import the variant.
set -u
cd "$(dirname "$0")/.."
ROOT=$PWD

if [ "${1:-}" = "--make" ]; then
  name=${2:?usage: scripts/ab_bench.sh --make NAME [REV]}
  rm -rf ".ab/$name" && mkdir -p ".ab/$name"
  if [ -n "${3:-}" ]; then
    git archive "$3" tp_softmax csrc | tar -x -C ".ab/$name"
  else
    cp -r tp_softmax csrc ".ab/$name/"
  fi
  find ".ab/$name" -name __pycache__ -prune -exec rm -rf {} +
  echo "made .ab/$name from ${3:-the working tree}"
  exit 0
fi
[ $# -ge 1 ] || { sed -n '2,16p' "$0"; exit 2; }
for v in "$@"; do
  [ -f ".ab/$v/tp_softmax/__init__.py" ] && [ -d ".ab/$v/csrc" ] || { echo "ab_bench: no variant .ab/$v"; exit 2; }
done

OUT=${OUT:-/tmp/ab_out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
# variant NAME CMD...: run CMD with variant NAME's package and build folder
variant() {
  local v=$1
  shift
  TP_SOFTMAX_PKG=$ROOT/.ab/$v TP_SOFTMAX_BUILD_DIR=/tmp/ab_build_$v "$@"
}

for v in "$@"; do  # the builds, in parallel
  variant "$v" env PYTHONPATH="$ROOT/.ab/$v" python3 -P -c "import tp_softmax, tp_softmax._build as b
ok = b.load(); print('$v: built', ok, 'from', tp_softmax.__file__, b.load_error() or '')" > "$OUT/build_$v.log" 2>&1 &
done
wait
for v in "$@"; do tail -n 1 "$OUT/build_$v.log"; done
for v in "$@"; do
  stages=bench
  [[ " ${AB_CHECK:-} " == *" $v "* ]] && stages="test sanitize bench"
  # shellcheck disable=SC2086
  variant "$v" env OUT="$OUT/$v" BENCH_ARGS="--contenders copy,tp_softmax ${BENCH_ARGS:-}" \
    scripts/gpu_check.sh $stages > "$OUT/gpu_check_$v.txt" 2>&1
  echo "$v:"
  sed -n '/==== summary/,$p' "$OUT/gpu_check_$v.txt" | tail -n +2
done

python3 - "$OUT" "$@" <<'PY' | tee "$OUT/ab_table.txt"
import csv
import os
import sys

out, names = sys.argv[1], sys.argv[2:]
cells, cases = {}, []
for v in names:
    path = os.path.join(out, v, "bench", "bench.csv")
    if not os.path.exists(path):
        print(f"{v}: no bench.csv")
        continue
    with open(path) as f:
        for row in csv.DictReader(f):
            if row["contender"] != "tp_softmax" or row["status"] != "ok":
                continue
            if row["case"] not in cases:
                cases.append(row["case"])
            cells[(v, row["case"])] = f"{float(row['ms']):.4f}/{float(row['efficiency']):.3f}"
print("ms / efficiency (floor / measured), each variant against the copy baseline of its own bench run")
print("case".ljust(26) + "".join(v.rjust(16) for v in names))
for c in cases:
    print(c[:25].ljust(26) + "".join(cells.get((v, c), "-").rjust(16) for v in names))
PY
