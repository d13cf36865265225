#!/usr/bin/env bash
# The effort table on a GPU window, in one command: `bdcodec bench --efforts` over a folder, several images at
# a time on the one GPU (there the fit runs whole, the entropy model with it), merged into one table.
#
#   scripts/gpu-effort.sh OUTDIR [MINUTES]        (MINUTES: the whole script's budget, default 9.3)
#
# Settings, as environment variables:
#   FOLDER     the PNG images (default .bench/kodak under the repository)
#   EFFORTS    default 0,9;  QUALITIES  default 0,20,40,50,60,70,80,90
#   PROCS      images benched at once (default 6), each process pinned to its share of the host's cores
#              (unpinned when there are fewer cores than processes)
#   WEIGHTS    default the shipped ones;  DEVICE  default cuda (cpu for a dry run)
#   LPIPS      AlexNet features for the LPIPS column (default .bench/alexnet-features-fp16.pth when there)
#   WORK       a folder kept between runs (default a temporary one, deleted at the end): each image's bench
#              goes on from the points an earlier run left there (`bdcodec bench --resume`), so a measurement
#              longer than one window (effort 9 over Kodak on a 2-core CPU: DEVICE=cpu PROCS=2, about 13 hours)
#              adds up over several runs
# The images travel as an ignored folder of their own (the training pack in .gpu would not fit beside them):
#   mkdir -p .bench/kodak && cp ../shared/data/kodak/*.png .bench/kodak/ && cp .gpu/alexnet-features-fp16.pth .bench/
# then carry .bench and .whl.  An image whose bench has not finished within the budget is left out of the table
# and named.  OUTDIR gets effort.md (the table), effort.csv (every row of the images done), effort-logs.tar.gz
# (each image's bench log, results and points, from which `--resume` can go on) and gpu-effort.log.  The exit status is 0 only when the table was made.
set -uo pipefail
[ $# -ge 1 ] || { echo "usage: scripts/gpu-effort.sh OUTDIR [MINUTES]" >&2; exit 2; }
out=$(realpath -m "$1")
budget=${2:-9.3}
folder=$(realpath -m "${FOLDER:-$(dirname "$0")/../.bench/kodak}")
lpips=${LPIPS:-$(dirname "$0")/../.bench/alexnet-features-fp16.pth}
cd "$(dirname "$0")/.." || exit 1  # the repository root: its bdcodec, its scripts
procs=${PROCS:-6}

[ -d "$folder" ] || { echo "no folder $folder" >&2; exit 1; }
images=()
for img in "$folder"/*; do
    case "${img,,}" in *.png) images+=("$img") ;; esac
done
[ ${#images[@]} -gt 0 ] || { echo "no PNG images in $folder" >&2; exit 1; }

log=gpu-effort.log
. scripts/gpu-env.sh
lpips_args=()
if [ -f "$lpips" ]; then lpips_args=(--lpips-weights "$lpips"); else echo "no LPIPS weights at $lpips: LPIPS n/a"; fi

echo "== ${#images[@]} images, efforts ${EFFORTS:-0,9}, $procs at a time"
if [ -n "${WORK:-}" ]; then
    work=$(realpath -m "$WORK")
    clean() { :; }
else
    work=$(mktemp -d /tmp/bdcodec-effort.XXXXXX)
    clean() { rm -rf "$work"; }
fi
mkdir -p "$work/img" "$work/res" || exit 1
cores=$(nproc)
per=$(( cores / procs ))
slot=0
pids=()
for img in "${images[@]}"; do
    while [ "$(jobs -rp | wc -l)" -ge "$procs" ]; do sleep 1; done
    name=$(basename "${img%.*}")
    mkdir -p "$work/img/$name" && ln -sfn "$img" "$work/img/$name/"
    pin=()
    if [ "$per" -ge 1 ] && command -v taskset > /dev/null; then
        first=$(( (slot % procs) * per ))
        pin=(taskset -c "$first-$((first + per - 1))")
    fi
    slot=$((slot + 1))
    limit=$(( $(left) - 30 ))
    [ "$limit" -gt 60 ] || { echo "budget spent: $name and the images after it not started"; break; }
    ( timeout "$limit" "${pin[@]}" python3 -m bdcodec bench "$work/img/$name" \
        --codecs bdcodec --modes fidelity --qualities "${QUALITIES:-0,20,40,50,60,70,80,90}" \
        --efforts "${EFFORTS:-0,9}" --no-speed --device "${DEVICE:-cuda}" ${WEIGHTS:+--weights "$WEIGHTS"} \
        "${lpips_args[@]}" --resume --out "$work/res/$name" >> "$work/res/$name.log" 2>&1
      echo "$name: exit $? after $(elapsed) s" ) &
    pids+=($!)
done
# not a bare wait, which would wait for the log's tee too
[ ${#pids[@]} -eq 0 ] || wait "${pids[@]}"
done_csv=()
for img in "${images[@]}"; do
    name=$(basename "${img%.*}")
    if [ -f "$work/res/$name/results.csv" ]; then
        done_csv+=("$work/res/$name/results.csv")
    else
        echo "not done: $name"
        [ -f "$work/res/$name.log" ] && tail -n 3 "$work/res/$name.log"
    fi
done
(cd "$work/res" && tar czf "$out/effort-logs.tar.gz" ./*.log $(find . -name results.csv -o -name points.jsonl) \
    2>/dev/null)
[ ${#done_csv[@]} -gt 0 ] || { echo "no image done: no table"; clean; exit 1; }
echo "== table"
python3 scripts/bench-merge.py --csv "$out/effort.csv" "${done_csv[@]}" > "$out/effort.md"
status=$?
clean
cat "$out/effort.md"
echo "== done in $(elapsed) s"
exit $status
