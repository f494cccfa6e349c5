#!/usr/bin/env bash
# Set-up shared by the README's commands: torch (CPU build pinned, only when torch is missing),
# then the package with its C++ extension and the test extras: triton, the demo's scikit-learn
# (bundled digits), matplotlib and tqdm, pytest, pytest-benchmark, transformers (tiny randomly
# initialised HF models check the HF alignment specs; nothing is downloaded).
# Idempotent: a second run is quick.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if ! "$PYTHON" -c "import torch" 2>/dev/null; then
    # pin first: an unpinned torch (asked for by another package) would pull a CUDA build of GBs
    "$PYTHON" -m pip install --quiet "torch==2.13.0"
fi
"$PYTHON" -m pip install --quiet -e ".[test]"
"$PYTHON" - <<'PY'
from nlmerge import kernels
module, reason = kernels.load("cpu")
print("nlmerge: C++ kernels", "built" if module else f"NOT built ({reason}); using the PyTorch reference")
PY
