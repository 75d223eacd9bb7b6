#!/usr/bin/env bash
# GPU check, for one GPU, in one call.  First the GPU-readiness checks
# (bench/gpu_readiness.py: auto precision on this card, more processes than GPUs
# refused, channels_last and the fp16 skip decision across two tower processes
# sharing the card, an fp16 run, bitwise resume with train.deterministic, and the
# layout cost the exchange no longer pays), then the d2l experiment with distalex
# (default config = d2l's AlexNet chapter: 10 epochs, full Fashion-MNIST at 224,
# batch 128, SGD lr 0.01) with the GPU fast paths, then ONE epoch of d2l's
# own pipeline (bench/d2l_baseline.py: PIL Resize+ToTensor, 4 DataLoader
# workers, fp32 train_ch6).  Prints test accuracy, the distalex wall time and the
# throughput ratios (end to end and training steps only).  Installs nothing.
#
#   bash bench/gpu_check.sh                 # EPOCHS=10
#   EPOCHS=3 bash bench/gpu_check.sh        # shorter, if the lease is tight
#
# Time: the readiness checks take ~2-3 min (mostly process start-ups); on an
# H100 the distalex part should take ~1-3 min for 10 epochs (the d2l net is
# ~5.6 GFLOP per image, 600k images) and the baseline epoch well under a
# minute.  Each part has its own `timeout` (READINESS_TIMEOUT, DISTALEX_TIMEOUT,
# BASELINE_TIMEOUT; defaults 200 s, 240 s and 100 s, plus 10/30/10 s grace, so
# the script ends within ~9.8 min whatever happens: give run() timeout_s=600).
# If distalex hits its limit it is stopped with SIGTERM, writes a checkpoint
# and the script reports the epochs it finished.
# PARTS="readiness d2l baseline" (default: all three) picks the parts to run;
# PARTS=readiness alone (~3 min) runs only the readiness checks; adding "decode"
# (not in the default) runs bench/gpu_decode_check.py: data.decode=gpu's crops
# against the CPU path's (the pixel bound) and its speed (DECODE_TIMEOUT, 150 s).
#
# Environment (all optional):
#   EPOCHS=10            distalex epochs (d2l's 10)
#   FAST="train.mixed_precision=bf16 train.channels_last=true"   distalex fast paths
#   EXTRA=""             more distalex overrides (e.g. data.train_limit=2048 for a dry run)
#   BASELINE_ARGS=""     more bench/d2l_baseline.py arguments (e.g. --train-limit 2048)
#   PYTHON=python3       interpreter with torch, torchvision, accelerate (the device image has them)
#   DISTALEX_DATA        folder with the four Fashion-MNIST IDX files (.gz or unpacked)
#   OUT=/tmp/gpu_check   where the small result files go (gpu_check.json, gpu_readiness.json, logs, metrics)
#   ALLOW_CPU=1          run without a GPU (only for a dry run of this script)
#
# The device machine has no network and no omegaconf/wandb and maybe no Debian
# dataset.  Prepare here, once, and carry `.gpu` (about 33 MB):
#   echo /.gpu/ >> .git/info/exclude
#   mkdir -p .gpu/pydeps .gpu/fashion-mnist
#   cp /usr/share/datasets/fashion-mnist/*.gz .gpu/fashion-mnist/
#   cp -r /tmp/venv/lib/python3.11/site-packages/omegaconf .gpu/pydeps/   # pure Python; needs only PyYAML
# then: run(command="bash bench/gpu_check.sh", carry=[".gpu"], timeout_s=600)
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT="$(pwd)"
EPOCHS="${EPOCHS:-10}"
FAST="${FAST:-train.mixed_precision=bf16 train.channels_last=true}"
EXTRA="${EXTRA:-}"
BASELINE_ARGS="${BASELINE_ARGS:-}"
READINESS_TIMEOUT="${READINESS_TIMEOUT:-200}"
DISTALEX_TIMEOUT="${DISTALEX_TIMEOUT:-240}"
BASELINE_TIMEOUT="${BASELINE_TIMEOUT:-100}"
PARTS="${PARTS:-readiness d2l baseline}"
OUT="${OUT:-/tmp/gpu_check}"
RUNS="${RUNS:-/tmp/gpu_check_runs}"      # checkpoints (~190 MB each) stay out of $OUT
PY="${PYTHON:-python3}"
mkdir -p "$OUT" "$RUNS"
rm -f "$OUT"/distalex_summary.json "$OUT"/distalex_metrics.jsonl "$OUT"/baseline.json "$OUT"/gpu_check.json \
      "$OUT"/distalex.log "$OUT"/baseline.log "$OUT"/gpu_readiness.json "$OUT"/readiness.log

# Import path: the repository (no install), plus carried pure-Python packages if needed.
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
if ! "$PY" -c "import omegaconf" 2>/dev/null && [ -d "$ROOT/.gpu/pydeps" ]; then
    export PYTHONPATH="$ROOT/.gpu/pydeps:$PYTHONPATH"
fi
export WANDB_MODE=disabled PYTHONUNBUFFERED=1 DISTALEX_NO_DOWNLOAD=1

# Data: the first folder holding the four files.
if [ -z "${DISTALEX_DATA:-}" ]; then
    for d in /usr/share/datasets/fashion-mnist "$ROOT/.gpu/fashion-mnist" "$ROOT/data/fashion-mnist"; do
        if [ -e "$d/t10k-labels-idx1-ubyte.gz" ] || [ -e "$d/t10k-labels-idx1-ubyte" ]; then
            export DISTALEX_DATA="$d"; break
        fi
    done
fi
if [ -z "${DISTALEX_DATA:-}" ]; then
    echo "gpu_check: Fashion-MNIST not found; set DISTALEX_DATA or carry .gpu/fashion-mnist (see the header)" >&2
    exit 2
fi

"$PY" - <<'EOF' || exit 2
import os, sys
missing = []
for mod in ("torch", "torchvision", "accelerate", "omegaconf", "distalex"):
    try:
        __import__(mod)
    except Exception as exc:
        missing.append(f"{mod} ({exc})")
if missing:
    sys.exit("gpu_check: cannot import " + ", ".join(missing) + "; nothing is installed here (see the header)")
import torch, torchvision, accelerate
cuda = torch.cuda.is_available()
print(f"gpu_check: python {sys.version.split()[0]}, torch {torch.__version__}, torchvision {torchvision.__version__}, "
      f"accelerate {accelerate.__version__}, device {torch.cuda.get_device_name(0) if cuda else 'cpu'}, "
      f"data {os.environ['DISTALEX_DATA']}", flush=True)
if not cuda and not os.environ.get("ALLOW_CPU"):
    sys.exit("gpu_check: no CUDA device (set ALLOW_CPU=1 for a dry run)")
EOF
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
df -h /dev/shm 2>/dev/null | tail -1 | awk '{print "gpu_check: /dev/shm " $2 " (DataLoader workers of the baseline need a few hundred MB)"}'

now() { date +%s.%N; }
part() { case " $PARTS " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }

# ---------------------------------------------------------------- GPU readiness checks
RD_RC=0
if part readiness; then
    echo "gpu_check: readiness checks (bench/gpu_readiness.py)"
    RD_ARGS=()
    if [ -n "${ALLOW_CPU:-}" ] && ! "$PY" -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then
        RD_ARGS=(--dry-run-cpu)
    fi
    timeout --signal=TERM --kill-after=10 "$READINESS_TIMEOUT" \
        "$PY" bench/gpu_readiness.py --out "$OUT" "${RD_ARGS[@]}" 2>&1 | tee "$OUT/readiness.log" | grep "^gpu_readiness:"
    RD_RC=${PIPESTATUS[0]}
    echo "gpu_check: readiness exit $RD_RC (details: $OUT/gpu_readiness.json, $OUT/readiness.log)"
fi

# ---------------------------------------------------------------- data.decode=gpu (opt-in part)
if part decode; then
    echo "gpu_check: data.decode=gpu against the CPU path (bench/gpu_decode_check.py)"
    OUT="$OUT" timeout --signal=TERM --kill-after=10 "${DECODE_TIMEOUT:-150}" \
        "$PY" bench/gpu_decode_check.py 2>&1 | tee "$OUT/decode.log" | tail -25
    echo "gpu_check: decode exit ${PIPESTATUS[0]} (details: $OUT/gpu_decode_check.json, $OUT/decode.log)"
fi

# ---------------------------------------------------------------- distalex: the d2l experiment
DX_RC=0; BL_RC=0; t0=$(now); t1=$t0; t2=$t0; t3=$t0
if part d2l; then
DIR="$RUNS/distalex"
rm -rf "$DIR"
echo "gpu_check: distalex, $EPOCHS epochs: $FAST $EXTRA" 
t0=$(now)
# shellcheck disable=SC2086
timeout --signal=TERM --kill-after=30 "$DISTALEX_TIMEOUT" \
    "$PY" -m accelerate.commands.launch --num_processes 1 --num_machines 1 --dynamo_backend no \
    launch/train.py --split-mode single tracking.wandb=false train.progress=false \
    "train.output_dir=$DIR" "train.epochs=$EPOCHS" $FAST $EXTRA 2>&1 | tee "$OUT/distalex.log" | grep -v -i warn
DX_RC=${PIPESTATUS[0]}
t1=$(now)
echo "gpu_check: distalex exit $DX_RC after $(awk "BEGIN{print $t1 - $t0}") s"
cp "$DIR/summary.json" "$OUT/distalex_summary.json" 2>/dev/null
cp "$DIR/metrics.jsonl" "$OUT/distalex_metrics.jsonl" 2>/dev/null
fi

# ---------------------------------------------------------------- baseline: one epoch of the d2l baseline pipeline
if part baseline; then
echo "gpu_check: d2l baseline pipeline, 1 epoch"
t2=$(now)
# shellcheck disable=SC2086
timeout --signal=TERM --kill-after=10 "$BASELINE_TIMEOUT" \
    "$PY" bench/d2l_baseline.py --epochs 1 --cache-dir "$RUNS/fmnist-cache" --json-out "$OUT/baseline.json" \
    $BASELINE_ARGS 2>&1 | tee "$OUT/baseline.log" | grep -v -i warn
BL_RC=${PIPESTATUS[0]}
t3=$(now)
echo "gpu_check: baseline exit $BL_RC after $(awk "BEGIN{print $t3 - $t2}") s"
fi

# ---------------------------------------------------------------- report
DX_RC=$DX_RC BL_RC=$BL_RC DX_PROC_S=$(awk "BEGIN{print $t1 - $t0}") BL_PROC_S=$(awk "BEGIN{print $t3 - $t2}") \
EPOCHS="$EPOCHS" FAST="$FAST" EXTRA="$EXTRA" OUTDIR="$OUT" "$PY" - <<'EOF'
import json, os
from pathlib import Path
out = Path(os.environ["OUTDIR"])
def load(name):
    p = out / name
    return json.loads(p.read_text()) if p.is_file() else None
dx, bl = load("distalex_summary.json"), load("baseline.json")
epochs = []
if (out / "distalex_metrics.jsonl").is_file():
    epochs = [json.loads(l) for l in (out / "distalex_metrics.jsonl").read_text().splitlines()
              if l.strip() and "test_acc" in l]
rep = {"epochs_asked": int(os.environ["EPOCHS"]), "fast": os.environ["FAST"], "extra": os.environ["EXTRA"],
       "distalex_rc": int(os.environ["DX_RC"]), "baseline_rc": int(os.environ["BL_RC"]),
       "distalex_process_s": float(os.environ["DX_PROC_S"]), "baseline_process_s": float(os.environ["BL_PROC_S"])}
print("\n================ gpu_check ================")
rd = load("gpu_readiness.json")
if rd:
    rep["readiness"] = {name: r.get("status") for name, r in rd.items()}
    print("readiness: " + ", ".join(f"{name} {status}" for name, status in rep["readiness"].items()))
for e in epochs:
    print(f"  distalex epoch {e['epoch']:.2f}: loss {e.get('loss', float('nan')):.4f}, train acc "
          f"{e.get('train_acc', float('nan')):.4f}, test acc {e['test_acc']:.4f}, "
          f"{e.get('examples_per_sec', 0):.0f} ex/s (steps)")
if dx is None and epochs:
    # Stopped by its timeout (SIGTERM: checkpoint written, no summary): the finished epochs.
    last = epochs[-1]
    seen = sum(e["examples_per_sec"] * e["epoch_time_s"] for e in epochs if "epoch_time_s" in e)
    steps_t = sum(e["epoch_time_s"] for e in epochs if "epoch_time_s" in e)
    dx = {"steps": last["step"], "epochs": last["epoch"], "test_acc": last["test_acc"],
          "examples_per_sec": seen / max(steps_t, 1e-9), "wall_time_s": rep["distalex_process_s"],
          "device": "(interrupted run)", "interrupted": True}
    rep["distalex_interrupted"] = True
    print("distalex: stopped by its timeout; figures of the finished epochs, wall = process time")
if dx:
    ex = dx["steps"] * dx.get("global_batch", 128)
    rep.update({"device": dx.get("device"), "distalex_test_acc": dx.get("test_acc"),
                "distalex_epochs": dx.get("epochs"), "distalex_wall_s": dx["wall_time_s"],
                "distalex_train_ex_s": dx["examples_per_sec"], "distalex_e2e_ex_s": ex / dx["wall_time_s"],
                "distalex_mixed_precision": dx.get("mixed_precision")})
    print(f"distalex: {dx.get('epochs', 0):.2f} epochs on {dx.get('device')}, test acc {dx.get('test_acc', 0):.4f} "
          f"(target >= 0.88), wall {dx['wall_time_s']:.1f} s in-run ({rep['distalex_process_s']:.1f} s process), "
          f"{dx['examples_per_sec']:.0f} ex/s steps, {rep['distalex_e2e_ex_s']:.0f} ex/s end to end")
else:
    print("distalex: no summary (see distalex.log)")
if bl:
    rep.update({"baseline_test_acc": bl["test_acc"], "baseline_train_ex_s": bl["examples_per_sec"],
                "baseline_e2e_ex_s": bl["e2e_examples_per_sec"], "baseline_wall_s": bl["wall_time_s"],
                "baseline_epochs": bl["epochs"]})
    print(f"baseline: {bl['epochs']:.2f} epoch, test acc {bl['test_acc']:.4f}, {bl['examples_per_sec']:.0f} ex/s steps "
          f"(d2l's figure), {bl['e2e_examples_per_sec']:.0f} ex/s end to end, wall {bl['wall_time_s']:.1f} s")
else:
    print("baseline: no result (see baseline.log)")
if dx and bl:
    rep["ratio_e2e"] = rep["distalex_e2e_ex_s"] / bl["e2e_examples_per_sec"]
    rep["ratio_train"] = dx["examples_per_sec"] / bl["examples_per_sec"]
    rep["baseline_wall_projected_s"] = bl["wall_time_s"] * rep["epochs_asked"] / max(bl["epochs"], 1e-9)
    print(f"ratio distalex/baseline: end to end {rep['ratio_e2e']:.2f}x (target >= 5), training steps "
          f"{rep['ratio_train']:.2f}x; baseline's {rep['epochs_asked']} epochs would take ~"
          f"{rep['baseline_wall_projected_s']:.0f} s vs distalex's {dx['wall_time_s']:.0f} s")
(out / "gpu_check.json").write_text(json.dumps(rep, indent=2) + "\n")
print(f"results: {out}/gpu_check.json")
EOF
[ "$RD_RC" -eq 0 ] && [ "$DX_RC" -eq 0 ] && [ "$BL_RC" -eq 0 ]
