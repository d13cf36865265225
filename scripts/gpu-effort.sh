#!/usr/bin/env bash
# The effort table on a GPU window, in one command: `bdcodec bench --efforts` over a folder, several images at
# a time on the one GPU (there the fit runs whole, the entropy model with it), merged into one table.
#
#   scripts/gpu-effort.sh OUTDIR [MINUTES]        (MINUTES: the whole script's budget, default 9.3)
#
# FOLDER (default .bench/kodak), EFFORTS (default 0,9), QUALITIES (default 0,20,40,50,60,70,80,90), PROCS
# (default 6: images benched at once, each process pinned to its share of the host's cores), WEIGHTS
# (default: the shipped ones) and DEVICE (default cuda).  The images travel as an ignored folder of their
# own (the training pack in .gpu would not fit beside them):
#   mkdir -p .bench/kodak && cp ../shared/data/kodak/*.png .bench/kodak/     then carry .bench and .whl
# An image whose bench has not finished within the budget is left out of the table and named in the log.
# OUTDIR gets effort.csv (every row of the images done), effort.md (the table) and gpu-effort.log.
set -uo pipefail
[ $# -ge 1 ] || { echo "usage: scripts/gpu-effort.sh OUTDIR [MINUTES]" >&2; exit 2; }
out=$1
budget=${2:-9.3}
start=$(date +%s.%N)
mkdir -p "$out"
exec > >(tee -a "$out/gpu-effort.log") 2>&1
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
left() { python3 -c "import time; print(f'{$budget * 60 - (time.time() - $start):.0f}')"; }
folder=${FOLDER:-.bench/kodak}
procs=${PROCS:-6}

echo "== environment ($(date -u +%FT%TZ))"
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/bdcodec-site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/bdcodec-site${PYTHONPATH:+:$PYTHONPATH}
fi
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import torch, compressai, constriction; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())" \
    || exit 1
images=("$folder"/*.png)
[ -e "${images[0]}" ] || { echo "no PNG images in $folder" >&2; exit 1; }

echo "== ${#images[@]} images, efforts ${EFFORTS:-0,9}, $procs at a time"
work=/tmp/bdcodec-effort
rm -rf "$work" && mkdir -p "$work/img" "$work/res"
cores=$(nproc)
per=$(( cores / procs > 0 ? cores / procs : 1 ))
slot=0
pids=()
for img in "${images[@]}"; do
    while [ "$(jobs -rp | wc -l)" -ge "$procs" ]; do sleep 1; done
    name=$(basename "${img%.*}")
    mkdir -p "$work/img/$name" && ln -s "$(realpath "$img")" "$work/img/$name/"
    first=$(( (slot % procs) * per ))
    slot=$((slot + 1))
    limit=$(( $(left) - 30 ))
    [ "$limit" -gt 60 ] || { echo "budget spent: $name and the images after it not started"; break; }
    pin=()
    command -v taskset > /dev/null && pin=(taskset -c "$first-$((first + per - 1))")
    ( timeout "$limit" "${pin[@]}" python3 -m bdcodec bench "$work/img/$name" \
        --codecs bdcodec --modes fidelity --qualities "${QUALITIES:-0,20,40,50,60,70,80,90}" \
        --efforts "${EFFORTS:-0,9}" --no-speed --device "${DEVICE:-cuda}" ${WEIGHTS:+--weights "$WEIGHTS"} \
        --out "$work/res/$name" > "$work/res/$name.log" 2>&1
      echo "$name: exit $? after $(python3 -c "import time; print(f'{time.time() - $start:.0f}')") s" ) &
    pids+=($!)
done
wait "${pids[@]}"  # not a bare wait: that would wait for the log's tee too
for img in "${images[@]}"; do
    name=$(basename "${img%.*}")
    [ -f "$work/res/$name/results.csv" ] || { echo "not done: $name"; tail -3 "$work/res/$name.log" 2>/dev/null; }
done
echo "== table"
python3 scripts/bench-merge.py --csv "$out/effort.csv" "$work"/res/*/results.csv | tee "$out/effort.md"
echo "== done in $(python3 -c "import time; print(f'{time.time() - $start:.0f}')") s"
