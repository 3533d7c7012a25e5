#!/usr/bin/env bash
# One call on a GPU machine: build the extension, run the GPU tests, compute-sanitizer on a
# subset, the sharding check on every GPU, the benchmark; a short summary table last.
#
#   scripts/gpu_check.sh [STAGE ...]     stages: env sass test sanitize shard generate bench tp4 ds ncu
#                                        (default: all but ds; tp4 needs 4 GPUs)
#   OUT=dir  where logs and bench output go (default: ./gpu_out)
#   WHEELS=dir  extra wheels to install first (e.g. deepspeed and its small deps)
#   BENCH_ARGS="..." passed to launch/bench.py
#   NCU_ONLY="NAME ..."  the ncu stage profiles only these of its cases (bloom gpt decode-b8-k64k ...)
#   NCU_SOURCE=1     the ncu stage also counts instructions per SASS line: src_NAME.csv and the
#                    report NAME.ncu-rep in OUT
#   TP_SOFTMAX_PKG=dir  import tp_softmax (and build the csrc/ beside it) from dir, not from this
#                       checkout: stages env, sass, test, sanitize, bench, ncu (the torchrun
#                       launchers import the checkout); scripts/ab_bench.sh uses it for variants
set -u -o pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export TP_SOFTMAX_BUILD_DIR=${TP_SOFTMAX_BUILD_DIR:-/tmp/tp_softmax_build}
export PYTHONPATH=${TP_SOFTMAX_PKG:-$PWD}${PYTHONPATH:+:$PYTHONPATH}
if [ -n "${WHEELS:-}" ] && ls "$WHEELS"/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "$WHEELS"/*.whl &&
    export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
# `python3 -P -m ...` keeps the working directory off sys.path, so PYTHONPATH decides which
# tp_softmax is imported.
STAGES=${*:-env sass test sanitize shard generate tp4 bench}
NGPU=$(python3 -c 'import torch; print(torch.cuda.device_count())')
declare -a SUMMARY
note() { SUMMARY+=("$(printf '%-10s %-6s %s' "$1" "$2" "$3")"); }
has() { [[ " $STAGES " == *" $1 "* ]]; }

if has env; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
  t0=$(date +%s)
  if python3 -P -m tp_softmax 2>&1 | tee "$OUT/env.txt"; then :; fi
  grep -q "fused CUDA kernel" "$OUT/env.txt" && note env ok "kernel built+loaded in $(( $(date +%s) - t0 )) s" || note env FAIL "kernel not usable (see env.txt)"
fi
if has sass; then
  python3 scripts/sass_report.py "$TP_SOFTMAX_BUILD_DIR" 2>&1 | tee "$OUT/sass.txt"
  rc=$?; note sass $([ $rc = 0 ] && echo ok || echo FAIL) "$(tail -1 "$OUT/sass.txt")"
fi
if has test; then
  # (--maxfail, not -x: one failure stopped the run and hid the tests after it)
  python3 -P -m pytest -q --maxfail=20 tests/test_cuda_kernel.py -p no:cacheprovider --durations=8 2>&1 | tee "$OUT/test_cuda.txt"
  rc=$?; note gpu-tests $([ $rc = 0 ] && echo ok || echo FAIL) "$(tail -1 "$OUT/test_cuda.txt")"
fi
if has sanitize; then
  for tool in memcheck racecheck; do
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool $tool --error-exitcode 9 \
      python3 scripts/sanitize_cases.py > "$OUT/sanitize_$tool.txt" 2>&1
    rc=$?; note $tool $([ $rc = 0 ] && echo ok || echo FAIL) "$(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$OUT/sanitize_$tool.txt" | tail -1)"
  done
fi
if has shard; then
  for n in $(seq 2 "$NGPU"); do
    [ "$n" = 2 ] || [ "$n" = 4 ] || [ "$n" = "$NGPU" ] || continue
    torchrun --standalone --nproc-per-node "$n" launch/verify_sharding.py 2>&1 | tee "$OUT/shard_$n.txt"
    rc=$?; note shard-$n $([ $rc = 0 ] && echo ok || echo FAIL) "$(tail -1 "$OUT/shard_$n.txt")"
  done
fi
if has generate; then
  for n in 2 4; do
    [ "$n" -le "$NGPU" ] || continue
    for dt in float16 bfloat16; do
      torchrun --standalone --nproc-per-node "$n" launch/generate.py --pad --dtype "$dt" 2>&1 | tee "$OUT/generate_${n}_$dt.txt"
      rc=$?; note gen-$n-$dt $([ $rc = 0 ] && echo ok || echo FAIL) "$(tail -1 "$OUT/generate_${n}_$dt.txt")"
    done
  done
fi
if has ds; then
  torchrun --standalone --nproc-per-node 2 launch/ds_bloom.py 2>&1 | tee "$OUT/ds_bloom.txt"
  rc=$?; note ds-bloom $([ $rc = 0 ] && echo ok || echo FAIL) "$(tail -1 "$OUT/ds_bloom.txt")"
fi
if has tp4 && [ "$NGPU" -ge 4 ]; then
  torchrun --standalone --nproc-per-node 4 launch/bench.py --only bloom176b-tp4 --out "$OUT/bench_tp4" 2>&1 | tee "$OUT/bench_tp4.txt"
  rc=$?; note bench-tp4 $([ $rc = 0 ] && echo ok || echo FAIL) "$(grep -i scaling "$OUT/bench_tp4.txt" | tail -1)"
fi
if has ncu; then
  # Achieved DRAM bandwidth, occupancy and grid of the kernel on cases short of their targets.
  : > "$OUT/ncu.txt"
  # NCU_ONLY="bloom gpt" profiles only those cases. One profiled run a case, saved as a report
  # (SourceCounters' per-instruction stall samples show only there); the details page goes to
  # ncu.txt, then the stall reasons as numbers from the report's raw page.
  rep_dir=$(mktemp -d)
  while read -r name args; do
    [ -n "${NCU_ONLY:-}" ] && [[ " $NCU_ONLY " != *" $name "* ]] && continue
    echo "=== $name: $args" >> "$OUT/ncu.txt"
    TP_SOFTMAX_LAUNCH_INFO=1 ncu --clock-control none --kernel-name regex:softmax_kernel --launch-skip 2 --launch-count 1 \
      --section SpeedOfLight --section LaunchStats --section Occupancy --section SchedulerStats --section WarpStateStats \
      --section SourceCounters ${NCU_SOURCE:+--section InstructionStats} -f -o "$rep_dir/$name" \
      python3 scripts/profile_case.py $args >> "$OUT/ncu.txt" 2>&1
    ncu --import "$rep_dir/$name.ncu-rep" --page details >> "$OUT/ncu.txt" 2>&1
    # The stall reasons: warps stalled per issued instruction, by reason.
    echo "--- stall reasons (warps stalled per issued instruction), $name" >> "$OUT/ncu.txt"
    ncu --import "$rep_dir/$name.ncu-rep" --page raw 2>&1 |
      grep -E 'issue_stalled_[a-z_]+_per_issue_active' >> "$OUT/ncu.txt"
    if [ -n "${NCU_SOURCE:-}" ]; then
      ncu --import "$rep_dir/$name.ncu-rep" --page source --csv --print-source sass > "$OUT/src_$name.csv" 2>&1
      cp "$rep_dir/$name.ncu-rep" "$OUT/"
    fi
  done <<'CASES'
bloom 1 56 112 2048 2048 fp16 causal alibi pad
gpt 8 16 16 1024 1024 bf16 causal pad
decode-b8-k64k 8 32 32 1 65536 bf16
fp32-alibi 4 16 32 512 512 fp32 causal alibi
k256k 1 128 128 1 262144 bf16
long-32k 1 2 2 32768 32768 bf16 causal
CASES
  rm -rf "$rep_dir"
  note ncu ok "$(grep -c 'DRAM Throughput' "$OUT/ncu.txt") profiles (ncu.txt)"
fi
if has bench; then
  python3 launch/bench.py --out "$OUT/bench" ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench.txt"
  rc=$?; note bench $([ $rc = 0 ] && echo ok || echo FAIL) "see bench.txt"
fi
echo
echo "==== summary ($(date -u +%F) $(head -1 "$OUT/gpu.txt" 2>/dev/null)) ===="
printf '%s\n' "${SUMMARY[@]}"
