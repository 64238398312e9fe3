#!/usr/bin/env bash
# One prepared device check (run through the device tool from the repository root):
# GPU tests of the processors, then bench/processors.py on cuda:0. Outputs go to $OUT.
# Python packages missing on the device image (it has CuPy, NumPy, SciPy, scikit-image,
# scikit-learn, pytest) travel as wheels in build/whl (ignored by git), made beforehand with
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux2014_x86_64 -d build/whl pydantic pydantic-core annotated-types \
#     typing-inspection typing-extensions pydicom skops prettytable wcwidth
# (versions pinned to the local venv's); nothing is fetched from the network there.
# Usage: bash bench/gpu_check.sh [targets] [tests] [rest]   (default: all three;
# REST_SLICES=200 runs the other processors at the full 512x512x200 size.)
set -u
STEPS=${*:-targets tests rest}
REST_SLICES=${REST_SLICES:-100}
OUT=${OUT:-/tmp/gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
mkdir -p /tmp/site
if ls build/whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site build/whl/*.whl 2>&1 | tail -3
fi
export PYTHONPATH=/tmp/site:$PWD
{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 --version
  # The checkout on sys.path, plus a minimal dist-info so that the entry points of
  # pyproject.toml exist (no build, no network).
  mkdir -p /tmp/site/dicom_node-0.1.0.dist-info
  python3 - <<'PY'
import tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
eps = project["entry-points"]
with open("/tmp/site/dicom_node-0.1.0.dist-info/METADATA", "w") as f:
    f.write(f"Metadata-Version: 2.1\nName: dicom-node\nVersion: {project['version']}\n")
with open("/tmp/site/dicom_node-0.1.0.dist-info/entry_points.txt", "w") as f:
    for group, items in eps.items():
        f.write(f"[{group}]\n" + "".join(f"{k} = {v}\n" for k, v in items.items()) + "\n")
PY
  python3 -c "import cupy, numpy, scipy, skimage, sklearn; print('cupy', cupy.__version__, 'numpy', numpy.__version__, 'scipy', scipy.__version__, 'skimage', skimage.__version__, 'sklearn', sklearn.__version__)"
  python3 -c "from processors.registry import discover; print([(i.name, i.available, i.reason) for i in discover() if not i.available] or 'all plugins available')"
} 2>&1 | tee "$OUT/setup.log"

# 1. The GPU targets, first (CuPy's kernel cache is cold: first calls include compilation).
[[ " $STEPS " == *" targets "* ]] && timeout 165 python3 bench/processors.py --device cuda:0 --repeat 3 \
  --only gaussian,median,label,nlm --json "$OUT/bench_gpu_targets.json" 2>&1 | tee "$OUT/bench_gpu_targets.log"

# 2. Every gpu-marked test (the xp fixture's cupy parameters and tests/gpu).
[[ " $STEPS " == *" tests "* ]] && timeout 110 python3 -m pytest -m gpu -q -p no:cacheprovider --confcutdir=tests/processors \
  tests/gpu tests/processors 2>&1 | tee "$OUT/pytest_gpu.log"

# 3. The other processors (by default on half the slices, to fit the device time).
[[ " $STEPS " == *" rest "* ]] && timeout 170 python3 bench/processors.py --device cuda:0 \
  --repeat 3 --shape "$REST_SLICES" 512 512 \
  --only mean,bilateral,window,histeq,clahe,threshold_segment,kmeans,features,predict \
  --json "$OUT/bench_gpu_rest.json" 2>&1 | tee "$OUT/bench_gpu_rest.log"
exit 0
