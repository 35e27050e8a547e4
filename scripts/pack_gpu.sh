#!/usr/bin/env bash
# Build xlpipe with CUDA and put what scripts/bench_gpu.sh needs on a GPU
# machine into gpu/ (git-ignored): xlpipe.xz, the stripped binary
# compressed (about 14 MB: a machine lent through a tool that carries at
# most 64 MiB takes it whole), and e5/, a model folder's config and
# tokenizer (the bench's random models take their vocabulary from it).
# Usage: scripts/pack_gpu.sh MODEL_DIR [cuda|cuda-fusion]
# CUDARC_CUDA_VERSION (default 13000) must match the GPU machine's CUDA.
set -euo pipefail
cd "$(dirname "$0")/.."
model=$1 features=${2:-cuda}
target=${CARGO_TARGET_DIR:-target}
CUDARC_CUDA_VERSION=${CUDARC_CUDA_VERSION:-13000} \
  cargo build --release --locked --features "$features"
mkdir -p gpu/e5
strip -o gpu/xlpipe "$target/release/xlpipe"
xz -9 -T0 -f gpu/xlpipe
for file in config.json tokenizer.json tokenizer_config.json special_tokens_map.json sentencepiece.bpe.model; do
  if [ -f "$model/$file" ]; then cp "$model/$file" gpu/e5/; fi
done
ls -l gpu/xlpipe.xz gpu/e5
cat <<'HOW'
On the GPU machine, from the repository root with gpu/ beside it (Python's
lzma unpacks it where no xz is installed):
  python3 -c "import lzma, shutil; shutil.copyfileobj(lzma.open('gpu/xlpipe.xz'), open('/tmp/xlpipe', 'wb'))"
  chmod +x /tmp/xlpipe && scripts/bench_gpu.sh /tmp/xlpipe gpu/e5 OUT_DIR
HOW
