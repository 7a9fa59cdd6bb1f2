#!/usr/bin/env bash
# One GPU check of mlkd, sized to finish in under 8 minutes on one H100: the GPU, the tests that need CUDA, the
# teacher and student benchmarks on CUDA, `mlkd estimate` of the real COCO / VOC configs on CUDA, and a short CUDA
# demo with its table. Everything goes under one folder (default gpu_check_out/, or $OUT, or the first argument),
# in six files: summary.txt (one line per step: its exit status and seconds), nvidia-smi.txt, tests.log,
# bench.log (each benchmark's JSON on its last line), estimate.log, demo.log (ends with the demo's table).
#
#   bash benchmarks/gpu_check.sh [OUT]
#
# It runs with the python3 of the machine (PYTHON=... to choose another) and mlkd from this checkout (src/ on
# PYTHONPATH, no install). Packages the GPU image may lack travel as wheels in .whl/ (lmdb; opencv-contrib-python-
# headless for selective search and EdgeBoxes; see docs/benchmarks.md) and are installed into /tmp/site first.
set -u -o pipefail
cd "$(dirname "$0")/.."
OUT=${1:-${OUT:-gpu_check_out}}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
if ls .whl/*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD/src:$PWD/benchmarks:${PYTHONPATH:-} PYTHONUNBUFFERED=1 MLKD_CACHE_DIR=/tmp/mlkd_cache
: > "$OUT/summary.txt"

step() {  # step NAME LOG SECONDS COMMAND...: run with a time limit, append its output to LOG, note status and time
    local name=$1 log=$2 limit=$3 start rc
    shift 3
    start=$(date +%s)
    echo "== $name: $*" >> "$OUT/$log"
    timeout "$limit" "$@" >> "$OUT/$log" 2>&1
    rc=$?
    echo "$name: exit $rc, $(( $(date +%s) - start )) s" | tee -a "$OUT/summary.txt"
}

step nvidia-smi nvidia-smi.txt 20 nvidia-smi
step versions nvidia-smi.txt 40 $PY -c "import torch, torchvision, cv2, mlkd; print('torch', torch.__version__,
'cuda', torch.version.cuda, torch.cuda.get_device_name(0), 'torchvision', torchvision.__version__, 'opencv',
cv2.__version__, 'mlkd', mlkd.__version__, 'ximgproc', hasattr(cv2, 'ximgproc'))"
# the tests that need a GPU, and the CUDA-relevant CPU tests beside them
step gpu-tests tests.log 100 $PY -m pytest -q -p no:cacheprovider -x tests/test_wsddn.py tests/test_step_speed_paths.py \
    tests/test_autotune.py tests/test_distinct_rois.py
step bench-teacher bench.log 120 $PY benchmarks/bench_teacher.py --device cuda --repeats 5 --json
step bench-student bench.log 80 $PY benchmarks/bench_student.py --device cuda --json
for config in teacher_coco teacher_voc07 student_coco_kd; do
    step "estimate-$config" estimate.log 40 $PY -m mlkd estimate --config "$config" --device cuda --steps 2
done
# a short demo on CUDA (fewer images; the student runs' epochs as shipped): its table is the end of demo.log
step demo demo.log 140 $PY -m mlkd demo --out /tmp/mlkd_gpu_demo --num-images 240 --quiet
echo "done: $OUT" | tee -a "$OUT/summary.txt"
