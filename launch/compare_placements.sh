#!/usr/bin/env bash
# Run ONE experiment in every placement -- single, ddp, model-parallel, hybrid, pipeline, fsdp -- and
# compare them (launch/compare.py): the side-by-side users otherwise assemble
# by hand in wandb.
#
#   launch/compare_placements.sh [-n NPROCS] [-o OUT_DIR] [--config PATH] [key=value ...]
#
#   -n NPROCS   processes for ddp, model-parallel, hybrid, pipeline, fsdp (default: the number of
#               CUDA devices when there are 2 or more, 1 with one GPU, 2 on a
#               CPU-only machine, where accelerate starts that many gloo ranks)
#   -o OUT_DIR  runs go to OUT_DIR/single, OUT_DIR/ddp, OUT_DIR/model-parallel,
#               OUT_DIR/hybrid, OUT_DIR/pipeline, OUT_DIR/fsdp, the comparison to OUT_DIR/comparison.{png,json}.  Default: the
#               train.output_dir override if given, else runs/compare-<config name>.
#   --config, key=value: passed to every run unchanged (e.g. train.max_steps=50,
#               model.towers=2 to compare two-tower nets everywhere; model-parallel
#               uses 2 towers unless model.towers is set).  Re-running into the
#               same OUT_DIR needs train.overwrite=true.
#
# Environment: PYTHON (default: python3, else python) runs everything;
# ACCELERATE_LAUNCH_ARGS adds flags to `accelerate launch` (e.g. a --config_file).
# Exit status: that of the first failing run (the others still run and are
# compared), else compare's.
set -uo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PY="${PYTHON:-$(command -v python3 || command -v python)}"
nprocs=""
out=""
config=""
overrides=()

usage() { sed -n '2,22p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }

while [ $# -gt 0 ]; do
    case "$1" in
        -h|--help) usage; exit 0 ;;
        -n|--nprocs) nprocs="${2:?-n needs a number}"; shift 2 ;;
        -o|--out) out="${2:?-o needs a directory}"; shift 2 ;;
        --config) config="${2:?--config needs a path}"; shift 2 ;;
        --config=*) config="${1#--config=}"; shift ;;
        --split-mode|--split-mode=*)
            echo "compare_placements: error: --split-mode is chosen by this script (it runs all five)" >&2
            exit 2 ;;
        train.output_dir=*) [ -n "$out" ] || out="${1#train.output_dir=}"; shift ;;
        train.mixed_precision=*) precision="${1#train.mixed_precision=}"; overrides+=("$1"); shift ;;
        *=*) overrides+=("$1"); shift ;;
        *) echo "compare_placements: error: unexpected argument '$1' (want -n N, -o DIR, --config PATH, key=value)" >&2
           exit 2 ;;
    esac
done

if [ -n "$config" ] && [ ! -f "$config" ]; then
    echo "compare_placements: error: config file '$config' does not exist" >&2
    exit 2
fi
if [ -z "$nprocs" ]; then
    gpus="$("$PY" -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)"
    if [ "${gpus:-0}" -ge 2 ]; then nprocs="$gpus"
    elif [ "${gpus:-0}" -eq 1 ]; then nprocs=1
    else nprocs=2
    fi
fi
case "$nprocs" in
    ''|*[!0-9]*|0) echo "compare_placements: error: -n wants a positive number of processes, got '$nprocs'" >&2; exit 2 ;;
esac
if [ -z "$out" ]; then
    name="$(basename "${config:-d2l_fashion_mnist}")"
    out="runs/compare-${name%.*}"
fi
config_args=()
[ -n "$config" ] && config_args=(--config "$config")
precision="${precision:-no}"

free_port() { "$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

run_mode() {  # mode nprocs
    local mode="$1" n="$2" dir="$out/$1"
    local cmd
    if [ "$n" -eq 1 ]; then
        cmd=("$PY" "$here/train.py")
    else
        # shellcheck disable=SC2206
        cmd=("$PY" -m accelerate.commands.launch --multi_gpu --num_processes "$n" --num_machines 1
             --mixed_precision "$precision" --dynamo_backend no --main_process_port "$(free_port)"
             ${ACCELERATE_LAUNCH_ARGS:-} "$here/train.py")
    fi
    echo "== $mode: $n process(es) -> $dir" >&2
    "${cmd[@]}" "${config_args[@]}" --split-mode "$mode" "${overrides[@]}" "train.output_dir=$dir"
}

status=0
dirs=()
[ "$nprocs" -eq 1 ] && echo "compare_placements: one device: ddp runs 1 replica, model-parallel, hybrid, pipeline and fsdp fall back to one device" >&2
for mode in single ddp model-parallel hybrid pipeline fsdp; do
    n="$nprocs"
    [ "$mode" = single ] && n=1
    if run_mode "$mode" "$n"; then
        dirs+=("$out/$mode")
    else
        rc=$?
        echo "compare_placements: $mode failed (exit $rc)" >&2
        [ "$status" -ne 0 ] || status=$rc
    fi
done

if [ ${#dirs[@]} -eq 0 ]; then
    echo "compare_placements: error: no run finished; nothing to compare" >&2
    exit "$status"
fi
"$PY" "$here/compare.py" "${dirs[@]}" --out "$out"
rc=$?
[ "$status" -ne 0 ] || status=$rc
exit "$status"
