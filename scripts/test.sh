#!/usr/bin/env bash
# The whole test suite (README: "Run the tests"); set-up included. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec "${PYTHON:-python3}" -m pytest -q tests "$@"
