#!/usr/bin/env bash
# One GPU call: scripts/ab_bench.sh on the variants given, then ncu with per-instruction counts of
# the first variant's kernel (or NCU_VARIANT's) on the cases named in NCU_CASES.
#
#   OUT=dir NCU_CASES="bloom gpt" AB_CHECK=... BENCH_ARGS=... scripts/ab_ncu.sh NAME...
#
#   AB_TIMEOUT   seconds for the A/B part (default 330)
#   NCU_CASES    any of: bloom gpt decode-b8-k64k (none: the A/B only)
#
# Into OUT: ab.txt (the A/B's output and table), test_NAME.txt (the tail of the GPU tests and the
# sanitizers' summaries of the variants in AB_CHECK), and per ncu case ncu_CASE.txt (the details
# page), src_CASE.csv (counts per SASS instruction) and the .ncu-rep.
set -u
cd "$(dirname "$0")/.."
O=${OUT:-/tmp/out}
mkdir -p "$O"
AB=/tmp/abo
OUT=$AB BENCH_ARGS="${BENCH_ARGS:-}" AB_CHECK="${AB_CHECK:-}" timeout "${AB_TIMEOUT:-330}" scripts/ab_bench.sh "$@" \
  > "$O/ab.txt" 2>&1
for v in "$@"; do
  [ -f "$AB/$v/test_cuda.txt" ] && tail -n 3 "$AB/$v/test_cuda.txt" > "$O/test_$v.txt"
  grep -h "SUMMARY" "$AB/$v"/sanitize_*.txt >> "$O/test_$v.txt" 2>/dev/null
done
date -u >> "$O/ab.txt"
v=${NCU_VARIANT:-$1}
while read -r name args; do
  [[ " ${NCU_CASES:-} " == *" $name "* ]] || continue
  # shellcheck disable=SC2086  # args: the case's words
  PYTHONPATH=.ab/$v TP_SOFTMAX_BUILD_DIR=/tmp/ab_build_$v timeout 150 ncu --clock-control none \
    --kernel-name regex:softmax_kernel --launch-skip 2 --launch-count 1 --section InstructionStats \
    --section SourceCounters --section SchedulerStats --section WarpStateStats --section SpeedOfLight \
    -f -o "/tmp/r_$name" python3 -P scripts/profile_case.py $args > "$O/ncu_$name.log" 2>&1
  ncu --import "/tmp/r_$name.ncu-rep" --page details > "$O/ncu_$name.txt" 2>&1
  ncu --import "/tmp/r_$name.ncu-rep" --page source --csv --print-source sass > "$O/src_$name.csv" 2>&1 ||
    ncu --import "/tmp/r_$name.ncu-rep" --page source --csv > "$O/src_$name.csv" 2>&1
  cp "/tmp/r_$name.ncu-rep" "$O/" 2>/dev/null
done <<'CASES'
bloom 1 56 112 2048 2048 fp16 causal alibi pad
gpt 8 16 16 1024 1024 bf16 causal pad
decode-b8-k64k 8 32 32 1 65536 bf16
CASES
date -u >> "$O/ab.txt"
