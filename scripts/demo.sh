#!/usr/bin/env bash
# The main job (README: "Quick start"): set-up, then `nlmerge demo` (three seeds, about a minute on
# 2 CPU cores). Extra arguments go to the demo (e.g. --quick, --out DIR, --seeds 0,1,2,3); the demo
# runs in the caller's directory, so a relative --out (and the default nlmerge-demo/) is there.
set -euo pipefail
bash "$(dirname "$0")/setup.sh"
# not `python -m`: it puts the caller's directory first on sys.path, and from this checkout's parent
# the checkout's own folder (named nlmerge) would hide the installed package
exec "${PYTHON:-python3}" -c 'import sys; sys.path[:] = [p for p in sys.path if p]; from nlmerge.cli import console; console()' demo "$@"
