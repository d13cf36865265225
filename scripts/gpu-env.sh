# Sourced by the GPU-window scripts (gpu-train.sh, gpu-effort.sh) from the repository root, with $out, $budget
# (minutes) and $log set: starts the clock and the log in $out, defines `left` (seconds of the budget left) and
# `elapsed`, installs what the machine lacks from the wheels in .whl, and says what the machine has.
start=$(date +%s.%N)
mkdir -p "$out" || exit 1
exec > >(tee -a "$out/$log") 2>&1
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
left() { python3 -c "import time; print(f'{$budget * 60 - (time.time() - $start):.0f}')"; }
elapsed() { python3 -c "import time; print(f'{time.time() - $start:.0f}')"; }

echo "== environment ($(date -u +%FT%TZ))"
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/bdcodec-site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/bdcodec-site${PYTHONPATH:+:$PYTHONPATH}
fi
command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, numpy, PIL, compressai, constriction; from PIL import features
print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'numpy', numpy.__version__,
      'pillow', PIL.__version__, 'avif', features.check('avif'), 'compressai', compressai.__version__)" || exit 1
