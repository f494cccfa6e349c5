#!/usr/bin/env bash
# The main job (README: "Quick start"): set-up, then `nlmerge demo` (three seeds, about a minute on
# 2 CPU cores). Extra arguments go to the demo (e.g. --quick, --out DIR, --seeds 0,1,2,3).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec "${PYTHON:-python3}" -m nlmerge.cli demo "$@"
