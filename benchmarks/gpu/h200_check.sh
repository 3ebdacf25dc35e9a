#!/usr/bin/env bash
# One GPU session, prepared in advance (the device is lent for minutes): build the CUDA extension,
# check every CUDA kernel against float64, sweep the kd_loss launch configurations, run the GPU
# benchmarks, and profile the kd_loss kernel with ncu. Logs and JSON go to $OUT (or /tmp/rd_gpu).
#   bash benchmarks/gpu/h200_check.sh [stage ...]     stages: build test sweep kd spmm linear ncu (default: all)
set -u
OUT=${OUT:-/tmp/rd_gpu}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 RAYDISTILL_CACHE_DIR=/tmp/rdcache MAX_JOBS=16
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
stages=${*:-build test sweep kd spmm linear ncu}
T0=$(date +%s)
for st in $stages; do
  echo "=== $st ($(( $(date +%s) - T0 )) s)"
  case $st in
    build) timeout 300 python3 -c "
from raydistill._build import load_extension, op_backend
s = load_extension(verbose=False); print(s)
print({op: op_backend(op, 'cuda') for op in ('kd_loss_fwd', 'kd_loss_topk_fwd', 'spmm', 'sddmm')})" 2>&1 | tail -5 | tee "$OUT/build.log" ;;
    test) timeout 240 python3 -m pytest -q -x -p no:cacheprovider tests/ops/test_devices.py -k cuda 2>&1 | tail -25 | tee "$OUT/tests.log"
          ls tests/ops/test_kd_loss_linear.py >/dev/null 2>&1 && timeout 120 python3 -m pytest -q -p no:cacheprovider tests/ops/test_kd_loss_linear.py -k cuda 2>&1 | tail -8 | tee -a "$OUT/tests.log"
          ls tests/ops/test_kd_loss_tail.py >/dev/null 2>&1 && timeout 120 python3 -m pytest -q -p no:cacheprovider tests/ops/test_kd_loss_tail.py -k cuda 2>&1 | tail -8 | tee -a "$OUT/tests.log" ;;
    sweep) timeout 150 python3 benchmarks/gpu/kd_cluster_sweep.py --out "$OUT/kd_cluster_sweep.json" 2>&1 | tail -40 ;;
    kd) RAYDISTILL_KD_KERNEL=cluster timeout 180 python3 -m raydistill.cli bench kd-loss --device cuda --reps 10 --quick --out "$OUT/kd_loss_cuda.json" 2>&1 | tail -30 ;;
    spmm) timeout 240 python3 -m raydistill.cli bench spmm --device cuda --out "$OUT/spmm_cuda.json" 2>&1 | tail -45 ;;
    linear) python3 -m raydistill.cli bench --help 2>&1 | grep -q kd-loss-linear && \
            timeout 150 python3 -m raydistill.cli bench kd-loss-linear --device cuda --out "$OUT/kd_loss_linear_cuda.json" 2>&1 | tail -20 ;;
    ncu) command -v ncu >/dev/null && RAYDISTILL_KD_KERNEL=cluster timeout 120 ncu --clock-control none -k regex:kd_ -c 2 \
           --section SpeedOfLight --section MemoryWorkloadAnalysis --section Occupancy --section LaunchStats \
           python3 benchmarks/gpu/kd_ncu_case.py 2>&1 | grep -E "kd_|Duration|DRAM Throughput|Memory Throughput|Achieved Occupancy|Registers|Block Size|Grid Size|Cluster|Theoretical Occ" | head -40 | tee "$OUT/ncu.log" ;;
  esac
done
echo "=== done ($(( $(date +%s) - T0 )) s)"
