#!/usr/bin/env bash
# One GPU window in one command: the CUDA tests beside training (stage rd, then the diffusion decoder on
# the new latents) within the time given, then weights, logs and the test report in OUTDIR.
#
#   scripts/gpu-train.sh OUTDIR [MINUTES]        (MINUTES: the whole script's budget, default 9.3)
#
# RD_SHARE (default 0.6) is the share of the training time given to the R-D stage, DIFFUSION_LR (default
# 1e-4) the diffusion stage's learning rate.  STAGE=diffusion gives the whole window to the diffusion
# decoder (the R-D parts stay those of the weights); DECODER=2 starts a fresh decoder of design 2 when
# the weights carry another; INIT=FILE starts from FILE instead of the shipped weights; GAN_WEIGHT, T_MIN,
# LATTICE_WEIGHT and LPIPS_WEIGHT pass --gan-weight, --t-min, --lattice-weight and --lpips-weight to the
# diffusion stage.  VARIANTS="A:ARGS;B:ARGS" trains several runs at once on the one GPU, each with its own
# extra arguments (which may name their own --stage and --lr), into OUTDIR/bdcodec-gpu-A.safetensors and so on.
#
# Run from the repository root on a CUDA machine with python3, torch, numpy, pillow, click and
# safetensors.  What it does not have comes along in ignored folders, prepared on a machine with pip
# (`mkdir -p .gpu` first):
#   .whl/   wheels of compressai, constriction, lpips, pytorch_msssim (installed with --no-index)
#   .gpu/train.tar                   python -m bdcodec.train pack --data ../shared/data/train --out .gpu/train.tar
#   .gpu/alexnet-features-fp16.pth   the LPIPS AlexNet features (optional: without, no LPIPS term)
# The working tree travels with what is carried (64 MiB in all; weights/ takes 31 MB, the pack 27 MB). To
# carry a second init for a variant ("narrow:--init .gpu/narrow.safetensors --stage rd"), halve it and the
# shipped weights with scripts/half-weights.py (R-D and distill stages only; the halved copy takes the shipped
# file's place in weights/ for the call, and `git checkout weights/` puts it back), and leave the AlexNet file out.
# The script ends before its budget and leaves usable weights even if training is cut short:
# OUTDIR/bdcodec-gpu.safetensors (sharded into files of at most 16 MiB when larger), gpu-train.log,
# cuda-report.json, curves-rd.png, curves-diffusion.png.
set -uo pipefail
[ $# -ge 1 ] || { echo "usage: scripts/gpu-train.sh OUTDIR [MINUTES]" >&2; exit 2; }
out=$1
budget=${2:-9.3}
log=gpu-train.log
. scripts/gpu-env.sh

echo "== CUDA tests (beside training; their report follows it)"
tests_log=/tmp/bdcodec-cuda-tests.txt
BDCODEC_CUDA_REPORT="$out/cuda-report.json" timeout 170 python3 -m pytest -q -p no:cacheprovider -rA \
    tests/test_cuda.py > "$tests_log" 2>&1 &
tests_pid=$!

echo "== training"
run=/tmp/bdcodec-run
# what is left, less 75 s: the last validation and export run past --minutes, and the fallback below
minutes=$(python3 -c "print(f'{($(left) - 75) / 60:.2f}')")
echo "training budget: $minutes minutes"
stage=${STAGE:-both}
if [ "$stage" = diffusion ]; then
    stage_args=(--stage diffusion --lr "${DIFFUSION_LR:-1e-4}")
else
    stage_args=(--stage both --rd-share "${RD_SHARE:-0.6}" --lr 1e-4 --diffusion-lr "${DIFFUSION_LR:-1e-4}")
fi
# train NAME [ARGS...]: one run into $run/NAME (or $run when NAME is empty) and OUTDIR/bdcodec-gpu[-NAME].safetensors;
# ARGS come last, so a --stage or --lr among them wins over the script's
train() {
    local name=$1 dir=$run${1:+/$1} file=$out/bdcodec-gpu${1:+-$1}.safetensors own=$stage a prev=
    shift
    for a in "$@"; do [ "$prev" = --stage ] && own=$a; prev=$a; done
    local run_dir=$dir
    [ "$own" = both ] || run_dir=$dir/$own
    timeout --signal=INT --kill-after=15 "$(python3 -c "print(int($minutes * 60 + 40))")" \
        python3 -m bdcodec.train "${stage_args[@]}" --run-dir "$run_dir" ${DECODER:+--decoder "$DECODER"} \
        ${INIT:+--init "$INIT"} ${GAN_WEIGHT:+--gan-weight "$GAN_WEIGHT"} ${T_MIN:+--t-min "$T_MIN"} \
        ${LATTICE_WEIGHT:+--lattice-weight "$LATTICE_WEIGHT"} ${LPIPS_WEIGHT:+--lpips-weight "$LPIPS_WEIGHT"} \
        --data .gpu/train.tar --val examples --val-limit 3 --minutes "$minutes" --crop 256 --batch 32 \
        --lr-final 1e-5 --ckpt-minutes 1 --val-every 200 --out "$file" --shard-mb 16 \
        --lpips-weights .gpu/alexnet-features-fp16.pth "$@" 2>&1 | sed -u "s/^/${name:+[$name] }/"
    echo "training${name:+ $name} exited with ${PIPESTATUS[0]}"
    compgen -G "${file%.safetensors}*.safetensors" > /dev/null && return
    # cut short: export the best checkpoint there is (the diffusion stage's holds the new rd weights too)
    if [ "$own" != both ] && [ -f "$run_dir/best.pt" ]; then
        python3 -m bdcodec.train --stage "$own" --run-dir "$run_dir" --export "$file" --shard-mb 16
    elif [ -f "$dir/diffusion/best.pt" ]; then
        python3 -m bdcodec.train --stage both --run-dir "$dir" --export "$file" --shard-mb 16
    elif [ -f "$dir/rd/best.pt" ]; then
        python3 -m bdcodec.train --stage rd --run-dir "$dir/rd" --export "$file" --shard-mb 16
    fi
}
if [ -n "${VARIANTS:-}" ]; then
    # several runs share the GPU at once, each with its own extra arguments: "NAME:ARGS;NAME:ARGS"
    IFS=';' read -ra variants <<< "$VARIANTS"
    pids=()
    for v in "${variants[@]}"; do
        read -ra extra <<< "${v#*:}"
        train "${v%%:*}" "${extra[@]}" &
        pids+=($!)
    done
    wait "${pids[@]}"
else
    train ""
fi
wait "$tests_pid"
echo "== CUDA tests"
tail -40 "$tests_log"
if [ -z "${VARIANTS:-}" ]; then
    for s in rd diffusion; do
        [ -f "$run/$s/curves.png" ] && cp "$run/$s/curves.png" "$out/curves-$s.png"
    done
fi
ls -la "$out"
echo "== done in $(elapsed) s"
