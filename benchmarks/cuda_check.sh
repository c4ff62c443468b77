#!/usr/bin/env bash
# GPU check of TAAN on one CUDA device (sized for an H200: about 6 minutes, at most 8).
#
#   bash benchmarks/cuda_check.sh [WHEEL_DIR]
#
# Run from the repository root on a machine with torch, triton, h5py, scipy, scikit-learn,
# matplotlib and tqdm. pytorch-ignite, tfrecord and crc32c are installed from WHEEL_DIR
# (default: the first of gpu/wheels, .whl, shared/device/wheels that exists; a folder of the
# checkout that .git/info/exclude ignores). Everything printed also goes to $OUT/cuda_check.log
# ($OUT defaults to /tmp/cuda_check):
#   1. benchmarks/layers.py (the tiny call's host time and operator count, the large call eager,
#      compiled and as CUDA graphs), youtube8m_step.py (without DMTRL Tucker and TT, whose
#      factors take minutes to build on the CPU) and omniglot_step.py with --device cuda, and
#      benchmarks/cuda_profile.py (launch cost against kernel time, CUDA graphs, profiles);
#   2. the CUDA tests: Triton kernels against the naive formula (float32, float64), gradcheck
#      in float64, grouped bases, the backward's bits run after run, torch.library.opcheck of
#      the operators, a compiled TAAN step (Inductor, and CUDA graphs) against eager, every
#      model's outputs and gradients CPU against CUDA, Omniglot runs stacked on CUDA against
#      the same runs one by one on the CPU;
#   3. the main job for 2 epochs on CUDA (python -m Youtube8M.run_builtin);
#   4. benchmarks/omniglot_sweep.py on CUDA: runs at once, and the whole figure's time projected;
#   5. python -m Omniglot.reproduce --preset quick on CUDA (synthetic alphabets), its table.
# Each step has a time limit, cut so that the whole script ends within BUDGET_S seconds.
set -u
cd "$(dirname "$0")/.."
if ! python3 -c "import torch" 2>/dev/null; then
  echo "cuda_check.sh: python3 has no torch here: run it where torch with CUDA is installed" >&2
  exit 1
elif ! python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "cuda_check.sh: no CUDA device here (torch.cuda.is_available() is False): run it on a GPU machine" >&2
  exit 1
fi
BUDGET_S=${BUDGET_S:-480}
start=$(date +%s)
out=${OUT:-/tmp/cuda_check}
mkdir -p "$out"
exec > >(tee -a "$out/cuda_check.log") 2>&1
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export TAAN_TAL_BACKEND=auto

wheels=${1:-}
for d in gpu/wheels .whl shared/device/wheels; do
  [[ -z $wheels && -d $d ]] && wheels=$d
done
status=0
step() {   # step NAME LIMIT_S COMMAND...: run with the smaller of LIMIT_S and what the budget leaves
  local name=$1 limit=$2; shift 2
  local left=$(( BUDGET_S - ($(date +%s) - start) ))
  (( limit > left )) && limit=$left
  echo; echo "== $name (limit ${limit} s, $(( $(date +%s) - start )) s elapsed)"
  if (( limit < 5 )); then echo "(skipped: no time left)"; status=1; return; fi
  timeout "$limit" "$@"
  local rc=$?
  echo "(exit $rc)"
  (( rc != 0 )) && status=1
}

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
if [[ -n $wheels ]]; then
  python3 -m pip install -q --no-deps --no-index --no-build-isolation "$wheels"/* 2>&1 | grep -v WARNING | tail -3
else
  echo "no wheel folder (gpu/wheels, .whl, shared/device/wheels): pytorch-ignite and tfrecord must be installed"
fi
python3 -c "import torch, triton, ignite; print('torch', torch.__version__, 'triton', triton.__version__, \
'ignite', ignite.__version__, torch.cuda.get_device_name(0))"

# The CPU side of the CPU-against-CUDA tests uses the C++ kernel: build it (about a minute on
# one core) while the GPU benchmarks run; without a compiler the PyTorch path runs instead.
timeout 240 python3 -c "from Layers._tal_build import load_extension; print('C++ kernel:', load_extension())" \
  > "$out/cpp_build.log" 2>&1 &
build=$!

step "TAL_Linear on CUDA (benchmarks/layers.py)" 100 python3 benchmarks/layers.py --device cuda
step "Youtube-8M step on CUDA" 75 python3 benchmarks/youtube8m_step.py --device cuda --repeats 3 \
  --models STL MRN SoftOrder DMTRL-LAF CrossStitch MMoE TAAN
step "Omniglot iteration on CUDA" 45 python3 benchmarks/omniglot_step.py --device cuda
step "Where the time goes (benchmarks/cuda_profile.py)" 60 python3 benchmarks/cuda_profile.py
wait "$build"      # (a plain `wait` would also wait for the tee above, forever)
cat "$out/cpp_build.log"
step "CUDA tests" 150 python3 -m pytest -q -p no:cacheprovider -rs tests \
  -k "cuda or gpu or device or triton"
step "main job, 2 epochs on CUDA" 60 python3 -m Youtube8M.run_builtin --max_epoch 2 --device cuda \
  --data_path /tmp/taan_builtin_data --out /tmp/taan_builtin
step "Omniglot runs at once on CUDA (benchmarks/omniglot_sweep.py)" 90 python3 benchmarks/omniglot_sweep.py \
  --devices cuda --runs 1 5 13 65 --repeats 3 --warmup 2
python3 -m Omniglot.synthetic --root /tmp/omniglot_synthetic > /dev/null
step "Omniglot figure, quick preset, on CUDA" 90 python3 -m Omniglot.reproduce --preset quick --device cuda \
  --data_root /tmp/omniglot_synthetic --results_dir /tmp/omniglot_quick
cat /tmp/omniglot_quick/table.md 2>/dev/null
echo; echo "== done in $(( $(date +%s) - start )) s, status $status"
exit $status
