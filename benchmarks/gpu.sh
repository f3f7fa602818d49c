#!/usr/bin/env bash
# The GPU figures in one command, from a fresh checkout, on a machine with a CUDA GPU and PyTorch:
# training throughput (real data path vs ceiling, peak memory, largest batch) of resnet50 and
# efficientnet-b0 at 380 px, bf16, channels-last, eager and compiled; a 2-epoch training at 380 px
# with its val macro-F1; `wbc predict` images/s on the GPU. One table; under 10 minutes.
#
#   benchmarks/gpu.sh                    # PBC in ../shared/data/pbc
#   benchmarks/gpu.sh --data DIR --out gpu.json
#   benchmarks/gpu.sh --dry-run          # CPU, tiny sizes: every code path of benchmarks/gpu_bench.py
#
# Packages: the project's own environment has everything. A bare GPU machine with only PyTorch (and
# numpy, pandas, scikit-learn, scipy, opencv, PyYAML, tqdm, filelock, Pillow) gets the rest from
# wheels in .whl/ (ignored by git), made beforehand on a machine with internet access; see
# "GPU in one command" in benchmarks/README.md for the exact commands. PYTHON picks the interpreter
# (default: python3).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if compgen -G ".whl/*.whl" >/dev/null; then
    site=${TMPDIR:-/tmp}/wbc-site
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
exec "$PYTHON" benchmarks/gpu_bench.py "$@"
