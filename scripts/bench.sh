#!/usr/bin/env bash
# The merge-kernel benchmark table (README: "Quick start"); set-up included.
# Extra arguments go to benchmarks/bench_merge.py (e.g. --quick, --sizes 24).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec "${PYTHON:-python3}" benchmarks/bench_merge.py "$@"
