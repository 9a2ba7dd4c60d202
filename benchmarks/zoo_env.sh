#!/usr/bin/env bash
# The side environment of benchmarks/zoo_sweep.py (a benchmark, not CI): a virtual environment
# with torch, torchvision, timm, transformers and accelerate, plus netdoctor's own runtime
# dependencies, read from this checkout's pyproject.toml.
#
#     bash benchmarks/zoo_env.sh /path/to/zoo-venv          # a folder outside the repository
#     /path/to/zoo-venv/bin/python benchmarks/zoo_sweep.py --sample 30
#
# netdoctor itself is NOT installed into it: zoo_sweep.py puts this checkout's src/ first on
# sys.path (as the other benchmarks do), so one environment serves every checkout and worktree
# and always checks the code next to the script. To run `netdoctor` from the environment by
# hand, use PYTHONPATH=src.
#
# The pins are the versions the baseline in docs/benchmarks.md was measured with; override them
# through the environment (TORCH_VERSION=... bash benchmarks/zoo_env.sh DIR). From PyPI, torch
# brings its CUDA libraries: a few minutes and about 6 GB. PYTHON picks the interpreter
# (>= 3.10; default python3); PIP_INDEX_URL and friends are honoured by pip as usual.
set -euo pipefail

if [ $# -ne 1 ]; then
    echo "usage: bash benchmarks/zoo_env.sh VENV_DIR   (a folder outside the repository)" >&2
    exit 2
fi
VENV=$1
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
case "$(cd "$(dirname "$VENV")" 2>/dev/null && pwd)/$(basename "$VENV")/" in
    "$REPO"/*)
        echo "zoo_env.sh: $VENV is inside the repository; put the environment outside it" >&2
        exit 2
        ;;
esac

PYTHON=${PYTHON:-python3}
TORCH_VERSION=${TORCH_VERSION:-2.14.1}
TORCHVISION_VERSION=${TORCHVISION_VERSION:-0.29.1}
TIMM_VERSION=${TIMM_VERSION:-1.0.31}
TRANSFORMERS_VERSION=${TRANSFORMERS_VERSION:-5.25.0}
ACCELERATE_VERSION=${ACCELERATE_VERSION:-1.16.0}

"$PYTHON" -m venv "$VENV"
PY="$VENV/bin/python"
"$PY" -m pip install --upgrade pip

# netdoctor's runtime dependencies, as pyproject.toml lists them (markers included).
DEPS=$("$PY" - "$REPO/pyproject.toml" <<'EOF'
import sys

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

with open(sys.argv[1], "rb") as f:
    print("\n".join(tomllib.load(f)["project"]["dependencies"]))
EOF
)
mapfile -t DEP_LIST <<<"$DEPS"

# One resolve, so that the pins hold against netdoctor's own lower bounds (torch>=2.2).
"$PY" -m pip install \
    "torch==$TORCH_VERSION" \
    "torchvision==$TORCHVISION_VERSION" \
    "timm==$TIMM_VERSION" \
    "transformers==$TRANSFORMERS_VERSION" \
    "accelerate==$ACCELERATE_VERSION" \
    "${DEP_LIST[@]}"

"$PY" - "$REPO/src" <<'EOF'
import sys

sys.path.insert(0, sys.argv[1])
import timm, torch, torchvision, transformers  # noqa: E401
import netdoctor.check  # this checkout, through sys.path as zoo_sweep.py does

print(
    f"ready: torch {torch.__version__}, torchvision {torchvision.__version__}, "
    f"timm {timm.__version__}, transformers {transformers.__version__}, netdoctor from "
    f"{netdoctor.check.__file__.rsplit('/src/', 1)[0]}/src"
)
EOF
