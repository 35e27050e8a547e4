#!/usr/bin/env bash
# `xlpipe bench gpu` on a machine with an NVIDIA GPU, its output kept in
# OUT_DIR (bench-gpu.txt, and what the machine is: gpu.txt).
# Usage: [BENCH_ARGS="--bf16"] [BENCH_TIMEOUT=600] scripts/bench_gpu.sh XLPIPE MODEL_DIR OUT_DIR
#   XLPIPE     an xlpipe built with `cargo build --release --features cuda`
#              (CUDARC_CUDA_VERSION=13000 for CUDA 13 drivers)
#   MODEL_DIR  a Hugging Face encoder folder: its config and tokenizer give
#              the random models their vocabulary (weights are not read)
# burn-cuda compiles its kernels at run time with NVRTC: the CUDA toolkit's
# libraries, or those of PyTorch's pip packages, must be on the loader path.
set -uo pipefail
xlpipe=$1 model=$2 out=$3
mkdir -p "$out"
for lib in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib \
  $(python3 -c 'import nvidia, os; print(" ".join(os.path.join(p, d, "lib") for p in nvidia.__path__ for d in os.listdir(p)))' 2>/dev/null); do
  [ -d "$lib" ] && export LD_LIBRARY_PATH="$lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
done
{
  nvidia-smi
  nproc
  python3 -c 'import torch, sentence_transformers as st; print("torch", torch.__version__, "cuda", torch.version.cuda, "sentence-transformers", st.__version__)'
  ls ${LD_LIBRARY_PATH//:/ } 2>/dev/null | grep -E 'nvrtc|cublas' | sort -u | head
} > "$out/gpu.txt" 2>&1
cat "$out/gpu.txt"
time timeout "${BENCH_TIMEOUT:-600}" "$xlpipe" bench gpu "$model" --nmt tests/fixtures/tiny-m2m100 --python python3 ${BENCH_ARGS:-} \
  > "$out/bench-gpu.txt" 2> "$out/bench-gpu.err"
rc=$?
cat "$out/bench-gpu.txt"
tail -40 "$out/bench-gpu.err"
exit $rc
