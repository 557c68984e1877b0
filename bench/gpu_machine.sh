#!/usr/bin/env bash
# Settle the CUDA provider (issue 15) on a machine with an NVIDIA GPU, in one short run:
#   a fresh venv with planwire[cuda] (onnxruntime-gpu in place of onnxruntime), `plan-worker check
#   --device cuda`, the GPU tests (tests/test_gpu.py, and tests/test_device_state.py on the GPU), and the
#   `gpu` bench family; everything it prints and the bench JSON go to OUTDIR.
#
# usage: bench/gpu_machine.sh OUTDIR [--quick] [--system-site-packages] [--wheels DIR]
#        bench/gpu_machine.sh --download-wheels DIR [PYTHON_VERSION]
#   --quick                 the bench family's smoke-test sample sizes (a few minutes in all)
#   --system-site-packages  the venv sees the machine's packages (a CUDA torch for the eager baseline,
#                           numpy, onnx, pytest, ...); without it everything is installed from the index
#   --wheels DIR            offline: install onnxruntime-gpu and what the machine lacks (msgspec, pyzmq)
#                           from the wheels in DIR, nothing from an index (implies --system-site-packages)
#   --download-wheels DIR   on a connected machine: fetch those wheels for the GPU machine's Python
#                           (default 3.12) into DIR, then carry DIR there
# Exit status: 0 when the device checks out and every test passed; the bench's verdicts are in OUTDIR.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)

if [ "${1:-}" = "--download-wheels" ]; then
  dir=${2:?usage: bench/gpu_machine.sh --download-wheels DIR [PYTHON_VERSION]}
  pyver=${3:-3.12}
  plats=()
  for n in 17 24 27 28 31 34; do plats+=(--platform "manylinux_2_${n}_x86_64"); done
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$pyver" --implementation cp \
    "${plats[@]}" --platform manylinux2014_x86_64 -d "$dir" onnxruntime-gpu msgspec pyzmq || exit 1
  ls -l "$dir"
  exit 0
fi

OUT=${1:?usage: bench/gpu_machine.sh OUTDIR [--quick] [--system-site-packages] [--wheels DIR]}
shift
QUICK=""
SYSTEM=""
WHEELS=""
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) QUICK="--quick" ;;
    --system-site-packages) SYSTEM="--system-site-packages" ;;
    --wheels) WHEELS=$(cd "${2:?--wheels needs a directory}" && pwd); SYSTEM="--system-site-packages"; shift ;;
    *) echo "gpu_machine.sh: unknown option $1" >&2; exit 2 ;;
  esac
  shift
done
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
VENV=${PLANWIRE_GPU_VENV:-/tmp/planwire-gpu-venv}
PY="$VENV/bin/python"
PIP=("$PY" -m pip --disable-pip-version-check -q)
status=0

{
  echo "== machine"; date -u; uname -a
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
} >"$OUT/env.txt" 2>&1

echo "gpu_machine: venv $VENV ${SYSTEM:+(system site packages)}${WHEELS:+, offline from $WHEELS}" >&2
rm -rf "$VENV"
python3 -m venv $SYSTEM "$VENV" || exit 1
if [ -n "$WHEELS" ]; then
  # offline: the machine's own packages (torch, numpy, onnx, pytest, ...) plus the carried wheels; planwire
  # itself from this checkout, no dependency resolution (none can be fetched)
  "${PIP[@]}" install --no-index --no-deps "$WHEELS"/*.whl || exit 1
  "${PIP[@]}" install --no-index --no-deps --no-build-isolation -e . || exit 1
else
  # the lock's versions for all but onnxruntime (swapped below) and torch (a CUDA one for the baseline)
  grep -v -E '^(onnxruntime|torch)==' requirements.lock >"$VENV/constraints.txt"
  "${PIP[@]}" install -c "$VENV/constraints.txt" pip setuptools || exit 1
  "${PIP[@]}" install -c "$VENV/constraints.txt" --no-build-isolation -e '.[export,dev,cuda]' || exit 1
  # onnxruntime (a base dependency) and onnxruntime-gpu write the same onnxruntime/ package: remove both,
  # then put onnxruntime-gpu back alone (its CUDA/cuDNN wheels stay installed)
  gpu_version=$("$PY" -c "from importlib.metadata import version; print(version('onnxruntime-gpu'))")
  "${PIP[@]}" uninstall -y onnxruntime onnxruntime-gpu || exit 1
  "${PIP[@]}" install --no-deps "onnxruntime-gpu==$gpu_version" || exit 1
fi

{
  echo "== onnxruntime"
  "$PY" -c "import onnxruntime as o; print(o.__file__, o.__version__, o.get_available_providers())"
  echo "== torch"
  "$PY" -c "import torch; print(torch.__version__, 'cuda', torch.cuda.is_available())" 2>&1 || true
} >>"$OUT/env.txt" 2>&1
cat "$OUT/env.txt" >&2

echo "gpu_machine: plan-worker check --device cuda" >&2
"$VENV/bin/plan-worker" check --device cuda >"$OUT/check.txt" 2>&1 || status=1
cat "$OUT/check.txt" >&2

echo "gpu_machine: GPU tests" >&2
PLANWIRE_TEST_DEVICE=cuda PYTHONUNBUFFERED=1 "$PY" -m pytest -q -p no:cacheprovider -rs \
  tests/test_gpu.py tests/test_device_state.py >"$OUT/gpu-tests.txt" 2>&1 || status=1
tail -n 30 "$OUT/gpu-tests.txt" >&2

echo "gpu_machine: bench family gpu ${QUICK}" >&2
PYTHONUNBUFFERED=1 "$PY" -m bench --only gpu $QUICK --runs-dir "$OUT/runs" --out "$OUT/gpu-results.json" \
  >"$OUT/bench.txt" 2>&1 || status=1
tail -n 40 "$OUT/bench.txt" >&2

echo "gpu_machine: results in $OUT (status $status)" >&2
cd "$ROOT" && exit $status
