#!/usr/bin/env bash
# One GPU window in one command: the CUDA tests, then training (stage rd, then the diffusion decoder on
# the new latents) within the time given, then weights, logs and the test report in OUTDIR.
#
#   scripts/gpu-train.sh OUTDIR [MINUTES]        (MINUTES: the whole script's budget, default 9.3)
#
# RD_SHARE (default 0.6) is the share of the training time given to the R-D stage, DIFFUSION_LR (default
# 1e-4) the diffusion stage's learning rate.  STAGE=diffusion gives the whole window to the diffusion
# decoder (the R-D parts stay those of the weights); DECODER=2 starts a fresh decoder of design 2 when
# the weights carry another; INIT=FILE starts from FILE instead of the shipped weights; GAN_WEIGHT, T_MIN and
# LATTICE_WEIGHT pass --gan-weight, --t-min and --lattice-weight to the diffusion stage.
#
# Run from the repository root on a CUDA machine with python3, torch, numpy, pillow, click and
# safetensors.  What it does not have comes along in ignored folders, prepared on a machine with pip:
#   .whl/   wheels of compressai, constriction, lpips, pytorch_msssim (installed with --no-index)
#   .gpu/train.tar                   python -m bdcodec.train pack --data ../shared/data/train --out .gpu/train.tar
#   .gpu/alexnet-features-fp16.pth   the LPIPS AlexNet features (optional: without, no LPIPS term)
# The script ends before its budget and leaves usable weights even if training is cut short:
# OUTDIR/bdcodec-gpu.safetensors (sharded into files of at most 16 MiB when larger), gpu-train.log,
# cuda-report.json, curves-rd.png, curves-diffusion.png.
set -uo pipefail
out=${1:?usage: scripts/gpu-train.sh OUTDIR [MINUTES]}
budget=${2:-9.3}
start=$(date +%s.%N)
mkdir -p "$out"
exec > >(tee -a "$out/gpu-train.log") 2>&1
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
left() { python3 -c "import time; print(f'{$budget * 60 - (time.time() - $start):.0f}')"; }

echo "== environment ($(date -u +%FT%TZ))"
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/bdcodec-site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/bdcodec-site${PYTHONPATH:+:$PYTHONPATH}
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, numpy, PIL, compressai, constriction; from PIL import features
print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'numpy', numpy.__version__,
      'pillow', PIL.__version__, 'avif', features.check('avif'), 'compressai', compressai.__version__)" || exit 1

echo "== CUDA tests"
BDCODEC_CUDA_REPORT="$out/cuda-report.json" timeout 170 python3 -m pytest -q -p no:cacheprovider -rA \
    tests/test_cuda.py 2>&1 | tail -40

echo "== training"
run=/tmp/bdcodec-run
# what is left, less 75 s: the last validation and export run past --minutes, and the fallback below
minutes=$(python3 -c "print(f'{($(left) - 75) / 60:.2f}')")
echo "training budget: $minutes minutes"
stage=${STAGE:-both}
if [ "$stage" = diffusion ]; then
    stage_args=(--stage diffusion --run-dir "$run/diffusion" --lr "${DIFFUSION_LR:-1e-4}")
else
    stage_args=(--stage both --run-dir "$run" --rd-share "${RD_SHARE:-0.6}" --lr 1e-4 --diffusion-lr "${DIFFUSION_LR:-1e-4}")
fi
timeout --signal=INT --kill-after=15 "$(python3 -c "print(int($minutes * 60 + 40))")" \
    python3 -m bdcodec.train "${stage_args[@]}" ${DECODER:+--decoder "$DECODER"} ${INIT:+--init "$INIT"} \
    ${GAN_WEIGHT:+--gan-weight "$GAN_WEIGHT"} ${T_MIN:+--t-min "$T_MIN"} \
    ${LATTICE_WEIGHT:+--lattice-weight "$LATTICE_WEIGHT"} --data .gpu/train.tar \
    --val examples --val-limit 3 --minutes "$minutes" --crop 256 --batch 32 --lr-final 1e-5 \
    --ckpt-minutes 1 --val-every 200 --out "$out/bdcodec-gpu.safetensors" --shard-mb 16 \
    --lpips-weights .gpu/alexnet-features-fp16.pth
status=$?
echo "training exited with $status"
if ! compgen -G "$out/bdcodec-gpu*.safetensors" > /dev/null; then
    # cut short: export the best checkpoint there is (the diffusion stage's holds the new rd weights too)
    if [ "$stage" = diffusion ] && [ -f "$run/diffusion/best.pt" ]; then
        python3 -m bdcodec.train --stage diffusion --run-dir "$run/diffusion" --export "$out/bdcodec-gpu.safetensors" --shard-mb 16
    elif [ -f "$run/diffusion/best.pt" ]; then
        python3 -m bdcodec.train --stage both --run-dir "$run" --export "$out/bdcodec-gpu.safetensors" --shard-mb 16
    elif [ -f "$run/rd/best.pt" ]; then
        python3 -m bdcodec.train --stage rd --run-dir "$run/rd" --export "$out/bdcodec-gpu.safetensors" --shard-mb 16
    fi
fi
for stage in rd diffusion; do
    [ -f "$run/$stage/curves.png" ] && cp "$run/$stage/curves.png" "$out/curves-$stage.png"
done
ls -la "$out"
echo "== done in $(python3 -c "import time; print(f'{time.time() - $start:.0f}')") s"
