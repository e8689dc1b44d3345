#!/usr/bin/env bash
# The GPU checks and benchmarks of the README's results, in one go on one CUDA GPU (about 5 minutes on an H200):
#
#   PLRD_SHARED_DATA=DATA_DIR bash benchmarks/gpu_runs.sh OUT_DIR TOKENIZER_DIR
#
# DATA_DIR: the shared data folder (WikiText-2, see plrd_jax.data.corpora); TOKENIZER_DIR: the embedded parent's
# tokenizer (any family directory's tokenizer/ folder). The parent's weights are not needed: the heal benchmark
# uses random weights of its shape (benchmarks/configs/smollm2-135m.json). Each part has its own time limit,
# so one failing part does not stop the others.
set -u -o pipefail
out=${1:?usage: gpu_runs.sh OUT_DIR TOKENIZER_DIR}; tokenizer=${2:?usage: gpu_runs.sh OUT_DIR TOKENIZER_DIR}
[ -f "$tokenizer/tokenizer.json" ] || { echo "error: $tokenizer holds no tokenizer.json" >&2; exit 2; }
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv | tee "$out/gpu.txt"
python -c "import jax, flax, optax, orbax.checkpoint as o; print('jax', jax.__version__, jax.devices(), \
'flax', flax.__version__, 'optax', optax.__version__)" 2>&1 | tee -a "$out/gpu.txt"
JAX_PLATFORMS=cuda timeout 120 python -m pytest -q -x tests/test_gpu.py 2>&1 \
    | tail -n 15 | tee "$out/pytest.txt"
# three processes share the card (the members' forwards here, the plrd_jax and torch heal workers): jax
# allocates on demand instead of taking most of it up front
XLA_PYTHON_CLIENT_PREALLOCATE=false timeout 300 python benchmarks/bench_heal.py --config-json benchmarks/configs/smollm2-135m.json \
    --dtype bfloat16 --batch 32 --seq-len 1024 --steps 5 --fractions 0.75,0.5,0.25 --peak-gflops 989000 \
    --json "$out/bench_heal_gpu.json" 2>&1 | grep -v "^\s*$" | tail -n 12 | tee "$out/bench_heal_gpu.txt"
timeout 300 python benchmarks/gpu_pretrain.py --tokenizer "$tokenizer" --presets llama-60m \
    --methods full,cola,sltrain --steps 80 --batch-size 256 --seq-len 256 --json "$out/gpu_pretrain.json" 2>&1 \
    | tail -n 12 | tee "$out/gpu_pretrain.txt"
