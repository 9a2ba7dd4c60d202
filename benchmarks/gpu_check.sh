#!/usr/bin/env bash
# netdoctor's CUDA path, measured in one go: at most 8 minutes on one GPU.
#
#   bash benchmarks/gpu_check.sh          # on a machine with a GPU
#   bash benchmarks/gpu_check.sh --cpu    # a dry check of the same commands on the CPU
#
# It runs, on the device,
#   (a) the README's probe demo, `netdoctor probe fixtures/sick/lenet_sigmoid.py:LeNet --data
#       synthetic` (and again with --precision fp16 and bf16 when `probe` has that option);
#   (b) `netdoctor run` on every fixtures/loops/amp_*.py: the healthy fp16 + GradScaler and bf16
#       loops, the Lightning fit in 16-mixed and bf16-mixed, the Hugging Face Trainer with fp16
#       and bf16, and whatever other amp_*.py exist, each with --device when it takes one;
#   (c) `python benchmarks/run_overhead.py --device DEVICE --models all` in reduced rounds.
# and prints what it measured: the device, torch's version, each command's exit code, time and
# findings, and the overhead table. It exits 1 when a command crashed (no report, a traceback,
# an internal netdoctor error, or a timeout), else 0: findings are printed, not judged.
#
# Environment: PYTHON (default python3), OUT (a folder: the log and the JSON reports, as one
# tar.gz, are written there). netdoctor's own dependencies (click, rich, onnx, libcst, numpy)
# must be importable; the ones missing are named at the start.
set -u
cd "$(dirname "$0")/.."
REPO=$PWD
PYTHON=${PYTHON:-python3}
export PYTHONPATH="$REPO/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 NO_COLOR=1 COLUMNS=100

DEVICE=cuda
if [ "${1:-}" = "--cpu" ]; then
    DEVICE=cpu
elif ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check: no CUDA device: a dry check on the CPU"
    DEVICE=cpu
fi
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
LOG="$WORK/gpu_check.log"
# seconds for all commands (a command starting later is skipped, and counted), and the end
BUDGET=450 END=480
[ "$DEVICE" = cpu ] && BUDGET=1500 END=1800  # a CPU step in fp16 takes seconds
CRASHED=0
exec > >(tee "$LOG") 2>&1

echo "== gpu_check on $DEVICE, $(date -u '+%Y-%m-%d %H:%M UTC')"
"$PYTHON" - "$DEVICE" <<'EOF'
import importlib.metadata, sys
import torch
device = sys.argv[1]
print(f"python {sys.version.split()[0]}, torch {torch.__version__}, CUDA {torch.version.cuda}")
if device == "cuda":
    p = torch.cuda.get_device_properties(0)
    print(f"device: {p.name}, {p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs, "
          f"bf16 supported: {torch.cuda.is_bf16_supported()}")
else:
    print("device: CPU")
import netdoctor
print(f"netdoctor {netdoctor.__version__} from {netdoctor.__file__}")
versions, missing = [], []
for name in ("click", "rich", "onnx", "libcst", "numpy", "pytorch-lightning", "lightning",
             "transformers", "accelerate"):
    try:
        versions.append(f"{name} {importlib.metadata.version(name)}")
    except importlib.metadata.PackageNotFoundError:
        missing.append(name)
print("packages: " + ", ".join(versions))
print("missing: " + (", ".join(missing) or "none") + " (lightning or pytorch-lightning will do)")
EOF

# summary REPORT.json: one line per finding, and the run's own account
summary() {
    "$PYTHON" - "$1" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
s = r.get("summary", {})
m = r.get("measurements", {})
run = m.get("run", {})
parts = [f"{s[k]} {k}(s)" for k in ("error", "warning", "info") if k in s]
loss = m.get("loss_curve") or []
extra = f", loss {loss[0]:.3g} -> {loss[-1]:.3g} over {len(loss)} steps" if loss else ""
if run:
    extra += f", stopped: {run.get('stopped')}" if run.get("stopped") else ""
print(f"   findings: {', '.join(parts) or s}{extra}")
for f in r.get("findings", []):
    loc = f.get("location") or {}
    where = f" at {loc.get('path', '').split('/')[-1]}:{loc.get('line')}" if loc else ""
    print(f"   {f['rule']} {f['name']} [{f['severity']}]{where}: {f['message'][:160]}")
for n in r.get("notes", []):
    if "internal netdoctor error" in n or "measurements took" in n or "precision" in n:
        print(f"   note: {n[:200]}")
internal = any("internal netdoctor error" in n for n in r.get("notes", []))
sys.exit(3 if internal or run.get("stopped") == "exception" else 0)
EOF
}

# check LABEL TIMEOUT REPORT COMMAND...: run it, print its exit code, time, output tail and
# findings; a crash is an exit code other than 0/1, no report, or the summary's verdict
check() {
    local label=$1 limit=$2 report=$3
    shift 3
    if [ "$SECONDS" -ge "$BUDGET" ]; then
        echo "-- $label: SKIPPED (the ${BUDGET} s budget is spent)"
        CRASHED=$((CRASHED + 1))
        return
    fi
    echo "-- $label"
    echo "   \$ ${*#$REPO/}"
    local t0=$SECONDS rc
    timeout "$limit" "$@" >"$WORK/out.txt" 2>&1
    rc=$?
    grep -v -e "Tip:" -e "deprecated" "$WORK/out.txt" | tail -n 3 | sed 's/^/   | /'
    echo "   exit $rc, $((SECONDS - t0)) s"
    if [ "$rc" -gt 1 ] || [ ! -s "$report" ] || ! summary "$report"; then
        echo "   CRASHED"
        grep -m1 -A3 "Traceback\|Error" "$WORK/out.txt" | sed 's/^/   ! /'
        CRASHED=$((CRASHED + 1))
    fi
}

ND=("$PYTHON" -m netdoctor)
echo
echo "== (a) the README's probe demo"
check "probe lenet_sigmoid" 120 "$WORK/probe.json" "${ND[@]}" probe \
    fixtures/sick/lenet_sigmoid.py:LeNet --data synthetic --device "$DEVICE" \
    --format json -o "$WORK/probe.json"
if "${ND[@]}" probe --help | grep -q -- "--precision"; then
    for p in fp16 bf16; do
        check "probe lenet_sigmoid --precision $p" 120 "$WORK/probe-$p.json" "${ND[@]}" probe \
            fixtures/sick/lenet_sigmoid.py:LeNet --data synthetic --device "$DEVICE" \
            --precision "$p" --format json -o "$WORK/probe-$p.json"
    done
fi

echo
echo "== (b) netdoctor run on the AMP loops (fixtures/loops/amp_*.py)"
for script in fixtures/loops/amp_*.py; do
    name=$(basename "$script" .py)
    case $name in
        amp_lightning*) variants="16-mixed bf16-mixed" ;;
        amp_hf_trainer*) variants="fp16 bf16" ;;
        *) variants="-" ;;
    esac
    args=()
    grep -q '"--device"' "$script" && args+=(--device "$DEVICE")
    for v in $variants; do
        vargs=("${args[@]}") report="$WORK/run-$name.json"
        if [ "$v" != "-" ]; then
            vargs+=(--precision "$v") report="$WORK/run-$name-$v.json"
        fi
        check "run $name ${vargs[*]}" 150 "$report" "${ND[@]}" run --format json -o "$report" \
            "$script" "${vargs[@]}"
    done
done

echo
echo "== (c) netdoctor run's overhead on the device (benchmarks/run_overhead.py)"
if [ "$DEVICE" = cuda ]; then
    rounds=2
    [ "$SECONDS" -gt 200 ] && rounds=1  # the first parts took long: keep within the 8 minutes
    bench=(--rounds "$rounds" --whole 0 --steps 30 --warmup 6)
else
    bench=(--rounds 1 --whole 0 --steps 4 --warmup 1)
fi
if [ "$SECONDS" -ge "$BUDGET" ]; then
    echo "-- run_overhead: SKIPPED (the ${BUDGET} s budget is spent)"
    CRASHED=$((CRASHED + 1))
else
    left=$((END - SECONDS))
    echo "   \$ python benchmarks/run_overhead.py --device $DEVICE --models all ${bench[*]}"
    t0=$SECONDS
    timeout "$left" "$PYTHON" benchmarks/run_overhead.py --device "$DEVICE" --models all \
        "${bench[@]}" --json "$WORK/overhead.json"
    rc=$?
    echo "   exit $rc, $((SECONDS - t0)) s"
    [ "$rc" -ne 0 ] && CRASHED=$((CRASHED + 1)) && echo "   CRASHED"
fi

echo
echo "== gpu_check on $DEVICE: $CRASHED command(s) crashed or skipped, ${SECONDS} s in all"
if [ -n "${OUT:-}" ]; then
    mkdir -p "$OUT"
    tar -czf "$OUT/gpu_check_reports.tar.gz" -C "$WORK" --exclude out.txt --exclude \
        gpu_check.log .
    cp "$LOG" "$OUT/gpu_check.log"
fi
[ "$CRASHED" -eq 0 ]
