#!/usr/bin/env bash
# Create the benchmark-only environment with mergekit 0.1.5 (never a dependency of evomerge).
# torch is pinned first so pip never swaps in a different (e.g. CUDA) build.
# Usage: benchmarks/make_mergekit_env.sh [VENV_DIR]   (default: /tmp/mergekit-env)
set -euo pipefail
VENV="${1:-/tmp/mergekit-env}"
python3 -m venv "$VENV"
nice -n 19 "$VENV/bin/pip" install -q "torch==2.13.0"
nice -n 19 "$VENV/bin/pip" install -q "torch==2.13.0" "mergekit==0.1.5" pyyaml
"$VENV/bin/python" -c "import importlib.metadata as m; print('mergekit', m.version('mergekit'), 'torch', m.version('torch'))"
