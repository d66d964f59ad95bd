#!/usr/bin/env bash
# Gather what scripts/gpu_check.sh needs on a GPU machine that has torch but no network:
#   .gpu/wheels/         hydra-core, omegaconf and antlr4-python3-runtime for Python 3.12
#   .gpu/fashion-mnist/  the four Fashion-MNIST .gz files (Debian's dataset-fashion-mnist)
# About 31 MB, git-ignored. Run it here (with network to PyPI), then carry .gpu along:
# see the header of scripts/gpu_check.sh.
# Usage: bash scripts/gpu_bundle.sh [PYTHON_VERSION]   (default 3.12, the GPU machine's)
set -euo pipefail
cd "$(dirname "$0")/.."
version=${1:-3.12}
python=${PYTHON:-python3}
[ -x .venv/bin/python ] && python=.venv/bin/python
rm -rf .gpu/wheels && mkdir -p .gpu/wheels .gpu/fashion-mnist

# Pure-Python wheels, pinned to what pyproject.toml admits (omegaconf pins antlr 4.9.*).
"$python" -m pip download --quiet --no-deps --only-binary=:all: --python-version "$version" \
    --implementation py --platform any -d .gpu/wheels "hydra-core==1.3.2" "omegaconf==2.3.0"
# antlr4-python3-runtime 4.9.3 is published only as source: build its (pure) wheel.
"$python" -m pip wheel --quiet --no-deps -w .gpu/wheels "antlr4-python3-runtime==4.9.3"

data=/usr/share/datasets/fashion-mnist
if [ ! -f "$data/train-images-idx3-ubyte.gz" ]; then
    echo "gpu_bundle: $data is missing: apt-get install dataset-fashion-mnist" >&2
    exit 1
fi
cp "$data"/*-ubyte.gz .gpu/fashion-mnist/
ls .gpu/wheels >&2
du -sh .gpu >&2
