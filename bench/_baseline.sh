#!/usr/bin/env bash
# Build the baseline venv for bench_bridge.py: the original jupyter_http_over_ws 0.0.8 on the
# newest stack where it still works (docs: shared/docs/testbed.md, "The old extension").
# Usage: bench/_baseline.sh [VENV_DIR]   (default: bench/.venv-baseline). Idempotent.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
venv="${1:-$here/.venv-baseline}"
python="${PYTHON:-python3}"
if [[ -x "$venv/bin/python" ]] && "$venv/bin/python" -c 'import jupyter_http_over_ws, notebook' 2>/dev/null; then
    echo "$venv"
    exit 0
fi
"$python" -m venv "$venv"
# keep it out of git without touching the repo's .gitignore (what Python 3.13 venv does)
echo '*' > "$venv/.gitignore"
# notebook 7 dropped notebook.base, and tornado >= 6.5 breaks the extension's cookie login
"$venv/bin/python" -m pip install -q \
    "notebook==6.5.7" "jupyter_http_over_ws==0.0.8" "tornado==6.4.2" setuptools >&2
echo "$venv"
