#!/usr/bin/env bash
# One GPU call: scripts/ab_bench.sh on the variants given, then the ncu stage of
# scripts/gpu_check.sh, with counts per SASS instruction, on the first variant's kernel (or
# NCU_VARIANT's) for the cases named in NCU_CASES.
#
#   OUT=dir NCU_CASES="bloom gpt" AB_CHECK=... BENCH_ARGS=... scripts/ab_ncu.sh NAME...
#
#   AB_TIMEOUT   seconds for the A/B part (default 330)
#   NCU_CASES    cases of gpu_check.sh's ncu stage (bloom gpt decode-b8-k64k ...); none: the A/B only
#
# Into OUT: ab.txt (the A/B's output and table), test_NAME.txt (the tail of the GPU tests and the
# sanitizers' summaries of the variants in AB_CHECK), and from the ncu stage ncu.txt (details
# pages and stall reasons), src_CASE.csv (counts per SASS instruction) and CASE.ncu-rep.
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
if [ -n "${NCU_CASES:-}" ]; then
  OUT=$O TP_SOFTMAX_PKG=$PWD/.ab/$v TP_SOFTMAX_BUILD_DIR=/tmp/ab_build_$v NCU_ONLY=$NCU_CASES NCU_SOURCE=1 \
    scripts/gpu_check.sh ncu > "$O/ncu_stage.txt" 2>&1
  date -u >> "$O/ab.txt"
fi
