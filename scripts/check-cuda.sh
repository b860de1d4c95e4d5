#!/usr/bin/env bash
# Proves that the `cuda` feature compiles, on a machine without a GPU or a CUDA install:
# NVIDIA's CUDA 13.4 compiler wheels from PyPI supply nvcc, and `cargo check --features
# cuda,bench --lib --benches --examples` builds candle's CUDA kernels and type-checks ours,
# benches and examples included. The tests, which never touch a GPU, are left out: checking
# them again with the feature took CI a few minutes and proved nothing the CPU build does not.
# Nothing is run on a GPU.
#
#   scripts/check-cuda.sh          # about 11 minutes from clean on 2 cores (nvcc on candle's kernels)
#
# Environment: CUDA_VENV (default target/cuda-venv) is where the wheels go; CUDA_COMPUTE_CAP
# (default 90, Hopper) the architecture nvcc compiles for.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${CUDA_VENV:-target/cuda-venv}
# cudarc 0.19 knows toolkits up to 13.4: keep the compiler on 13.4.x. CCCL's wheels are
# versioned on their own; 13.3.5 is the release that ships with the 13.4 toolkit.
WHEELS=(
    "nvidia-cuda-nvcc==13.4.92"
    "nvidia-nvvm==13.4.92"
    "nvidia-cuda-crt==13.4.92"
    "nvidia-cuda-runtime==13.4.92"
    "nvidia-cuda-cccl==13.3.5.0.6"
)
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
fi
"$VENV/bin/pip" install --quiet --disable-pip-version-check "${WHEELS[@]}"

CUDA_ROOT=$("$VENV/bin/python" -c 'import os, nvidia; print(os.path.join(list(nvidia.__path__)[0], "cu13"))')
export CUDA_ROOT CUDA_PATH="$CUDA_ROOT" CUDA_HOME="$CUDA_ROOT"
export PATH="$CUDA_ROOT/bin:$PATH"
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}
# CCCL (cub, thrust, libcu++) headers live in their own folder of the wheel.
export NVCC_PREPEND_FLAGS="-I$CUDA_ROOT/include/cccl ${NVCC_PREPEND_FLAGS:-}"
nvcc --version | tail -n 1

cargo check --release --features cuda,bench --lib --benches --examples
echo "check-cuda: the cuda feature compiles (nvcc $(nvcc --version | sed -n 's/.*release \([0-9.]*\).*/\1/p'), sm_${CUDA_COMPUTE_CAP})"
