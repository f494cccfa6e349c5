#!/usr/bin/env bash
# Set-up shared by the README's commands: torch (CPU build pinned, only when torch is missing),
# then the package with its C++ extension and the test extras: triton, the demo's scikit-learn
# (bundled digits), matplotlib and tqdm, pytest, pytest-benchmark, transformers (tiny randomly
# initialised HF models check the HF alignment specs; nothing is downloaded).
# Skips what is installed and up to date: pip runs only when nlmerge is not installed from this
# checkout or pyproject.toml, setup.py or csrc/ changed since the last install
# (scripts/install_state.py), so a second run takes seconds. One line per step.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
say() { echo "setup: $*"; }

if version=$("$PYTHON" -c "import torch; print(torch.__version__)" 2>/dev/null); then
    say "torch $version is installed"
else
    # pin first: an unpinned torch (asked for by another package) would pull a CUDA build of GBs
    say "installing torch==2.13.0 (CPU build; a few minutes on a fresh machine)"
    "$PYTHON" -m pip install --quiet "torch==2.13.0"
fi
if state=$("$PYTHON" scripts/install_state.py check); then
    say "nlmerge: $state"
else
    say "$state: installing nlmerge, its C++ kernels and the test extras (pip install -e \".[test]\"; about a minute)"
    # compat: the checkout goes on sys.path, so a folder named nlmerge in the current directory (the
    # clone, seen from its parent) cannot shadow the package for `python -m nlmerge` or torchrun
    "$PYTHON" -m pip install --quiet -e ".[test]" --config-settings editable_mode=compat
    "$PYTHON" scripts/install_state.py stamp
fi
"$PYTHON" - <<'PY'
from nlmerge import kernels
module, reason = kernels.load("cpu")
print("setup: nlmerge C++ kernels", "built" if module else f"NOT built ({reason}); using the PyTorch reference")
PY
