#!/usr/bin/env bash
# Create or reuse the project's virtual environment and install evomerge into it.
#
# Why a script: pip must see torch before anything that depends on it, or it pulls
# the newest CUDA build (gigabytes). On a machine that already has torch we reuse it
# through --system-site-packages instead of replacing it.
#
# Env: EVOMERGE_VENV (default .venv), PYTHON (default python3),
#      TORCH_SPEC (default torch==2.13.0, the CPU wheel this project's machines carry).
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${EVOMERGE_VENV:-.venv}"
python="${PYTHON:-python3}"
torch_spec="${TORCH_SPEC:-torch==2.13.0}"

if [ ! -x "$venv/bin/python" ]; then
    if "$python" -c "import torch" >/dev/null 2>&1; then
        echo "[venv] torch found in $python: reusing it (--system-site-packages)" >&2
        "$python" -m venv --system-site-packages "$venv"
    else
        "$python" -m venv "$venv"
    fi
fi
pip=("$venv/bin/python" -m pip --disable-pip-version-check -q)
quiet() {  # pip's config here names local mirrors that may be absent: drop those warnings only
    "$@" 2> >(grep -v "^WARNING: Location 'file://" >&2)
}
if ! "$venv/bin/python" -c "import torch" >/dev/null 2>&1; then
    echo "[venv] installing $torch_spec first" >&2
    quiet "${pip[@]}" install "$torch_spec"
fi
stamp="$venv/.evomerge-installed"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    echo "[venv] installing evomerge[dev,eval] (editable)" >&2
    quiet "${pip[@]}" install -e ".[dev,eval]"
    touch "$stamp"
fi
