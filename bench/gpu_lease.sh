#!/usr/bin/env bash
# One call on a lent GPU machine (a lease of minutes): build fastsd._C for the GPU that is there,
# then the GPU checks, most valuable first, each in its own time box, so that a step that runs long
# costs only itself:
#   1. build       setup.py build_ext --inplace (CUDA kernels for the visible GPU only)
#   2. selftest    python -m fastsd.selftest: every op, backend and dtype on cuda against the reference
#   3. tests       pytest -m gpu (the compiled Triton kernels: TRITON_INTERPRET=0)
#   4. kernels     python -m fastsd.bench.gpu_report without its tests and bench: per Triton kernel the
#                  time per launch, GB/s and share of peak, launches per call, the static model beside
#   5. host        bench/host_overhead.py --registered: host time per call, eager path against the
#                  registered ops (CUDA events around tiny calls)
#   6. bench       python -m fastsd.bench --device cuda, the quick suites and mix: the interleaved
#                  benchmark, its JSON
# Logs and reports go to $OUT (default bench-results/gpu-lease): 8 files, the most a lease returns (host.log is folded into kernels.log). The static model
# (python -m fastsd.bench.sass --json FILE, no GPU needed) is read from $STATIC when that file exists.
# Usage: OUT=dir [STATIC=sass.json] [LIMITS="build selftest tests kernels host bench" seconds]
#        [BENCH_OPS="patch_swap losses icp mix"] bash bench/gpu_lease.sh
set -u
OUT=${OUT:-bench-results/gpu-lease}
mkdir -p "$OUT"
PY=${PY:-python3}
STATIC=${STATIC:-bench-results/sass.json}
read -r L_BUILD L_SELFTEST L_TESTS L_KERNELS L_HOST L_BENCH <<<"${LIMITS:-150 90 150 70 40 150}"
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
SUMMARY="$OUT/summary.txt"
: >"$SUMMARY"

step() {  # step NAME LIMIT_S COMMAND...: its output in $OUT/NAME.log, a line in the summary
    local name=$1 limit=$2 t0 rc
    shift 2
    t0=$(date +%s)
    timeout -k 5 "$limit" "$@" >"$OUT/$name.log" 2>&1
    rc=$?
    echo "$name: rc=$rc in $(($(date +%s) - t0)) s (limit $limit s)" | tee -a "$SUMMARY"
    tail -n "${TAIL:-8}" "$OUT/$name.log" | cut -c1-200
}

{
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader
    $PY -c "import torch, triton, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, torch.cuda.get_device_name())"
    nvcc --version | tail -n 2
} 2>&1 | tee -a "$SUMMARY"

# fastsd.kernels is the top-level kernels/ folder (pip's package_dir); in place it is a link
[ -e fastsd/kernels ] || ln -s ../kernels fastsd/kernels
export CUDA_HOME=${CUDA_HOME:-$(dirname "$(dirname "$(command -v nvcc)")")}
step build "$L_BUILD" env FASTSD_BUILD_CUDA=1 MAX_JOBS="${MAX_JOBS:-$(nproc)}" $PY setup.py build_ext --inplace
cat fastsd/_build_log.txt >>"$OUT/build.log" 2>/dev/null
$PY -m fastsd.info 2>&1 | tee -a "$SUMMARY" | tail -n 12

step selftest "$L_SELFTEST" $PY -m fastsd.selftest
# pytest-xdist where present (the device image has it): 541 GPU tests compile their Triton kernels
# in 74 s on 12 workers of an H100 machine (2026-11-26), several minutes in one process
xdist=(); $PY -c "import xdist" 2>/dev/null && xdist=(-n "${TEST_WORKERS:-12}" --dist loadfile)
TAIL=12 step tests "$L_TESTS" $PY -m pytest -q -m gpu -p no:cacheprovider -ra ${xdist[@]+"${xdist[@]}"} tests
if [ -f "$STATIC" ]; then static=(--static-model "$STATIC" --skip tests bench); else static=(--skip tests bench static); fi
TAIL=30 step kernels "$L_KERNELS" $PY -m fastsd.bench.gpu_report "${static[@]}" --json "$OUT/gpu-report.json"
TAIL=20 step host "$L_HOST" $PY bench/host_overhead.py --registered --device cuda --backends triton,cuda,torch --min-time 0.2
{ echo "== host"; cat "$OUT/host.log"; } >>"$OUT/kernels.log" && rm -f "$OUT/host.log"
TAIL=30 step bench "$L_BENCH" $PY -m fastsd.bench --device cuda --quick --ops ${BENCH_OPS:-patch_swap losses icp mix} --no-plots \
    --json "$OUT/bench.json"
echo "== summary"; cat "$SUMMARY"
