#!/usr/bin/env bash
# Wheels the GPU machine's image lacks (it has torch, transformers, safetensors, tqdm, typer; crc32c: the
# hardware CRC32C of format-3 stores, prefixgen's numpy fallback is far slower),
# for Python 3.12 on x86-64, into .whl/ (git-ignored; carried to the device with `carry: [".whl"]`).
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d .whl \
  datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 "pyarrow>=24,<27" "crc32c>=2.7,<3"
ls -la .whl
