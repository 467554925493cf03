#!/usr/bin/env bash
# Creates .venv and installs the pack's dependencies (runtime + test) from pyproject.toml.
# torch is installed first and pinned: a bare "torch" requirement would pull GBs of CUDA packages.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}

if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip >/dev/null

if ! python -c "import torch" 2>/dev/null; then
  python -m pip install -q "torch==${TORCH_VERSION}"
fi
constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
python -c "import torch; print('torch==' + torch.__version__.split('+')[0])" >"$constraints"

python - <<'PY' >"$constraints.req"
import tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
deps = [d for d in project["dependencies"] if not d.startswith("torch")]
print("\n".join(deps + project["optional-dependencies"]["test"]))
PY
python -m pip install -q -c "$constraints" -r "$constraints.req"
rm -f "$constraints.req"
