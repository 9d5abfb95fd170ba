#!/usr/bin/env bash
# One command on a fresh GPU host: install what is missing, prove that gpunn's GPU path works and
# agrees with the CPU, train Example 6.2 once, time the benchmark, and write OUT_DIR/summary.json.
#
#     scripts/gpu_check.sh [--dry-run] OUT_DIR [DATA_DIR]
#
# OUT_DIR    a new or empty folder for the logs, the run (OUT_DIR/run) and summary.json
# DATA_DIR   the four MNIST files (default: $GPUNN_DATA_DIR; without either, MNIST is downloaded)
# --dry-run  print what each stage would run and write summary.json, running nothing
#
# Stages, in order: install (only the missing modules among numpy, tqdm, pytest, matplotlib, filelock,
# pooch, threadpoolctl, mpi4py (with mpich), cupy), gpu (nvidia-smi), cupy (CuPy's first kernel
# compilation), data, cuda-suite (pytest -m cuda, with the CUDA engines as the default: GPUNN_AUTO_ENGINES
# graph,fused,xp), agreement (tests/test_cuda_agreement.py, likewise), nccl (NCCL's one-rank path against
# one process), run (scripts/train_mnist.py --engine graph, the lecture's 15 epochs), bench
# (benchmarks/bench_mnist.py with the engines and the GPU peers, skipped where PyTorch is missing) and
# profile (Nsight Compute's per-kernel summary of one graph replay, skipped where ncu is missing). Every
# stage runs under `timeout`, and after installation all of them together stop within
# GPU_CHECK_BUDGET_S seconds.
# Works offline when everything is installed, from a checkout (PYTHONPATH=repo) or a pip install.
#
# Exit status: 0 when every stage passed (or was skipped), 1 when one failed, 2 for bad arguments,
# 130 when interrupted.
#
# Environment:
#   PYTHON                the interpreter to use (default: python3)
#   GPU_CHECK_BUDGET_S    seconds for all stages after installation (default: 480)
#   GPU_CHECK_CUPY        what to pip-install when CuPy is missing (default: cupy-cuda12x[ctk], or
#                         cupy-cuda13x[ctk] where nvidia-smi reports a CUDA 13 driver)
#   GPU_CHECK_BENCH_ARGS  benchmark flags (default: 3 runs of 3 epochs of 784-200-10, engines graph,
#                         fused and xp, peers PyTorch eager and compiled and JAX scan, to fit the budget)

set -u
set -o pipefail

PROG=$(basename "$0")
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

usage() {
    printf 'usage: %s [--dry-run] OUT_DIR [DATA_DIR]\n' "$PROG"
}

fail_usage() {
    {
        printf '%s: error: %s\n' "$PROG" "$1"
        usage
    } >&2
    exit 2
}

# --- arguments -----------------------------------------------------------------------------------

DRY_RUN=0
POSITIONAL=()
while (($# > 0)); do
    case "$1" in
    -h | --help)
        usage
        sed -n '2,/^$/s/^# \{0,1\}//p' "${BASH_SOURCE[0]}"
        exit 0
        ;;
    --dry-run) DRY_RUN=1 ;;
    --)
        shift
        POSITIONAL+=("$@")
        break
        ;;
    -*) fail_usage "unknown option $1" ;;
    *) POSITIONAL+=("$1") ;;
    esac
    shift
done
((${#POSITIONAL[@]} >= 1)) || fail_usage "OUT_DIR is missing"
((${#POSITIONAL[@]} <= 2)) || fail_usage "too many arguments"

OUT=${POSITIONAL[0]}
DATA=${POSITIONAL[1]:-${GPUNN_DATA_DIR:-}}
if [[ -n $DATA && ! -d $DATA ]]; then
    fail_usage "DATA_DIR $DATA is not a folder"
fi
if [[ -e $OUT && ! -d $OUT ]]; then
    fail_usage "OUT_DIR $OUT exists and is not a folder"
fi
if [[ -d $OUT && -n $(ls -A "$OUT") ]]; then
    fail_usage "OUT_DIR $OUT is not empty; give a new or empty folder"
fi

BUDGET=${GPU_CHECK_BUDGET_S:-480}
[[ $BUDGET =~ ^[0-9]+$ ]] || fail_usage "GPU_CHECK_BUDGET_S must be a whole number of seconds, not $BUDGET"
DEFAULT_BENCH="--repeats 3 --epochs 3 --models 784-200-10 --engines graph fused xp"
DEFAULT_BENCH+=" --peers pytorch pytorch-compiled jax-scan"
read -r -a BENCH_ARGS <<<"${GPU_CHECK_BENCH_ARGS-$DEFAULT_BENCH}"

PY=${PYTHON:-python3}
if ! command -v "$PY" >/dev/null 2>&1; then
    printf '%s: error: no Python interpreter %s (set PYTHON)\n' "$PROG" "$PY" >&2
    exit 1
fi
if ! command -v timeout >/dev/null 2>&1; then
    printf '%s: error: the timeout command (GNU coreutils) is missing\n' "$PROG" >&2
    exit 1
fi

mkdir -p "$OUT" || exit 1
OUT=$(cd "$OUT" && pwd)
[[ -z $DATA ]] || DATA=$(cd "$DATA" && pwd)
cd "$ROOT" || exit 1

# gpunn from this checkout, installed or not. TF32 stays off: the agreement bounds assume full FP32.
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export CUPY_TF32=0

STAGES="$OUT/stages.tsv"
: >"$STAGES"
INTERRUPTED=0
trap 'INTERRUPTED=1' INT

# --- stage bookkeeping ---------------------------------------------------------------------------

now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.1f", b - a }'; }

# record NAME STATUS EXIT_CODE SECONDS NOTE: one line of stages.tsv (pass, fail, skip or dry-run)
record() {
    local note=${5//$'\t'/ }
    printf '%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "${note//$'\n'/ }" >>"$STAGES"
}

# show_command WORD...: the command as one pasteable line, inline Python scripts shortened
show_command() {
    local word shown=()
    for word in "$@"; do
        if [[ $word == *$'\n'* ]]; then
            shown+=("<script>")
        else
            shown+=("$(printf '%q' "$word")")
        fi
    done
    printf '%s' "${shown[*]}"
}

# stage NAME CAP_S COMMAND...: run COMMAND under timeout (CAP_S, or what is left of the budget), its
# output to the terminal and to OUT/NAME.log; record the outcome. Returns the command's exit status.
stage() {
    local name=$1 cap=$2 note=${STAGE_NOTE:-}
    shift 2
    STAGE_NOTE=
    local limit=$cap left
    if [[ -n ${DEADLINE:-} ]]; then
        left=$((DEADLINE - $(date +%s)))
        ((left < limit)) && limit=$left
    fi
    local shown
    shown=$(show_command "$@")
    printf '\n=== %s (limit %s s): %s\n' "$name" "$limit" "$shown"
    if ((DRY_RUN)); then
        record "$name" dry-run 0 0 "would run: $shown"
        return 0
    fi
    if ((INTERRUPTED)); then
        record "$name" fail 130 0 "not started: interrupted"
        return 130
    fi
    if ((limit < 5)); then
        record "$name" fail 124 0 "not started: the ${BUDGET} s budget is spent"
        return 124
    fi
    local t0 rc seconds
    t0=$(now)
    timeout --foreground --signal=INT --kill-after=20 "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
    rc=${PIPESTATUS[0]}
    seconds=$(elapsed "$t0" "$(now)")
    if ((INTERRUPTED)); then
        note="interrupted${note:+; $note}"
    elif ((rc != 0)) && [[ -z $note ]]; then # the log's last words usually say why
        note=$(grep -v '^[[:space:]]*$' "$OUT/$name.log" | tail -n 1 | cut -c 1-300)
    fi
    if ((rc == 0)); then
        record "$name" pass 0 "$seconds" "$note"
    elif ((rc == 124 || rc == 137)); then
        record "$name" fail "$rc" "$seconds" "timed out after $limit s${note:+; $note}"
    else
        record "$name" fail "$rc" "$seconds" "$note"
    fi
    return "$rc"
}

# Rewrite the last line of stages.tsv (a pytest stage that passed but proved too little fails).
amend_last() {
    local status=$1 note=$2 name code seconds
    IFS=$'\t' read -r name _ code seconds _ <<<"$(tail -n 1 "$STAGES")"
    sed -i '$d' "$STAGES"
    record "$name" "$status" "$code" "$seconds" "$note"
}

# pytest_counts FILE: "PASSED FAILED SKIPPED" from a pytest --junitxml report
pytest_counts() {
    "$PY" - "$1" <<'EOF'
import sys
import xml.etree.ElementTree as ET

try:
    suites = ET.parse(sys.argv[1]).getroot().iter("testsuite")
except (OSError, ET.ParseError):
    print(0, 0, 0)
    raise SystemExit
tests = failed = skipped = 0
for s in suites:
    tests += int(s.get("tests", 0))
    failed += int(s.get("failures", 0)) + int(s.get("errors", 0))
    skipped += int(s.get("skipped", 0))
print(tests - failed - skipped, failed, skipped)
EOF
}

# --- install what is missing ---------------------------------------------------------------------

printf '%s: repository %s, Python %s, results in %s\n' "$PROG" "$ROOT" "$(command -v "$PY")" "$OUT"

DRIVER_CUDA=
if command -v nvidia-smi >/dev/null 2>&1; then
    DRIVER_CUDA=$(timeout 30 nvidia-smi 2>/dev/null | sed -n 's/.*CUDA Version: *\([0-9][0-9]*\).*/\1/p' | head -n 1)
fi
if [[ -n ${GPU_CHECK_CUPY:-} ]]; then
    CUPY_SPEC=$GPU_CHECK_CUPY
elif [[ $DRIVER_CUDA == 13 ]]; then
    CUPY_SPEC='cupy-cuda13x[ctk]>=14'
else
    CUPY_SPEC='cupy-cuda12x[ctk]>=14'
fi

has_cupy_distribution() {
    "$PY" -c '
import importlib.metadata as md
import sys

sys.exit(0 if any((d.metadata["Name"] or "").lower().startswith("cupy") for d in md.distributions()) else 1)
'
}

MISSING=()
SPECS=()
BROKEN_CUPY=
for pair in "numpy=numpy>=1.24" "tqdm=tqdm>=4.60" "pytest=pytest>=7.4" "matplotlib=matplotlib>=3.6" \
    "filelock=filelock>=3.12" "pooch=pooch>=1.8" "threadpoolctl=threadpoolctl>=3" "mpi4py=mpi4py>=4 mpich" \
    "cupy=$CUPY_SPEC"; do
    module=${pair%%=*}
    "$PY" -c "import $module" >/dev/null 2>&1 && continue
    if [[ $module == cupy ]] && has_cupy_distribution; then
        # Installed but broken: a second CuPy wheel beside it would make things worse.
        BROKEN_CUPY=$("$PY" -c "import cupy" 2>&1 | tail -n 1)
        continue
    fi
    MISSING+=("$module")
    read -r -a specs <<<"${pair#*=}"
    SPECS+=("${specs[@]}")
done
if ((${#MISSING[@]} == 0)); then
    printf '\n=== install: nothing to install\n'
    record install pass 0 0 "nothing missing"
else
    STAGE_NOTE="installed ${SPECS[*]}"
    stage install 900 "$PY" -m pip install "${SPECS[@]}"
fi
if [[ -n $BROKEN_CUPY ]]; then
    printf '%s: CuPy is installed but does not import: %s\n' "$PROG" "$BROKEN_CUPY"
    amend_last fail "CuPy is installed but does not import: $BROKEN_CUPY"
fi

# --- the checks, within the budget ---------------------------------------------------------------

DEADLINE=$(($(date +%s) + BUDGET))

GPU_QUERY=
if command -v nvidia-smi >/dev/null 2>&1; then
    stage gpu 30 nvidia-smi
    if ((!DRY_RUN)); then
        GPU_QUERY=$(timeout 30 nvidia-smi --query-gpu=name,driver_version,memory.total \
            --format=csv,noheader 2>/dev/null | head -n 1)
    fi
else
    printf '\n=== gpu: nvidia-smi is not on PATH\n'
    if ((DRY_RUN)); then
        record gpu dry-run 0 0 "nvidia-smi is not on PATH: a real check fails here"
    else
        record gpu fail 127 0 "nvidia-smi is not on PATH: no NVIDIA driver here?"
    fi
fi

stage cupy 180 "$PY" -c '
import json, sys, time
import cupy
import gpunn

started = time.perf_counter()
x = cupy.arange(1000, dtype=cupy.float32)
total = float((x * 2).sum())  # an elementwise and a reduction kernel, compiled by NVRTC on first use
compiled = time.perf_counter() - started
device = gpunn.get_device("cuda")
info = {
    "cupy": cupy.__version__,
    "cuda_runtime": cupy.cuda.runtime.runtimeGetVersion(),
    "cuda_driver": cupy.cuda.runtime.driverGetVersion(),
    "device": device.description(),
    "compute_capability": cupy.cuda.Device(0).compute_capability,
    "first_kernels_s": round(compiled, 3),
}
assert total == 999000.0, total
with open(sys.argv[1], "w") as f:
    json.dump(info, f)
cupy.show_config()
print(json.dumps(info))
' "$OUT/cupy.json"

if [[ -n $DATA ]]; then
    stage data 120 "$PY" -c '
import sys
from gpunn.data import load_idx_dataset

train, val = load_idx_dataset(sys.argv[1])
print(f"{sys.argv[1]}: {train.X.shape[0]} training and {val.X.shape[0]} validation images")
' "$DATA"
else
    STAGE_NOTE="MNIST from the cache, downloaded where missing"
    stage data 120 "$PY" -c '
import sys
from gpunn.data import resolve_data_dir

folder = resolve_data_dir(None, progress=False)
print(f"MNIST in {folder}")
with open(sys.argv[1], "w") as f:
    f.write(str(folder))
' "$OUT/data_dir.txt"
    [[ -s $OUT/data_dir.txt ]] && DATA=$(cat "$OUT/data_dir.txt")
fi
# The pytest stages read the real MNIST from here (tests marked mnist skip without it).
[[ -n $DATA ]] && export GPUNN_DATA_DIR="$DATA"

check_pytest() { # after a pytest stage: fail it when it passed without proving anything
    local name=$1 allow_skips=$2 passed failed skipped
    ((DRY_RUN)) && return
    [[ $(tail -n 1 "$STAGES" | cut -f1) == "$name" ]] || return
    read -r passed failed skipped <<<"$(pytest_counts "$OUT/$name.xml")"
    [[ -f $OUT/$name.xml ]] || return # not started: keep the reason
    local counts="$passed passed, $failed failed, $skipped skipped" earlier
    earlier=$(tail -n 1 "$STAGES" | cut -f5)
    if [[ $(tail -n 1 "$STAGES" | cut -f2) != pass ]]; then
        amend_last fail "$counts; ${earlier:-see $name.log}"
    elif ((passed == 0)); then
        amend_last fail "$counts: nothing ran on the GPU"
    elif ((!allow_skips && skipped > 0)); then
        amend_last fail "$counts: on a GPU host these must run, not skip (see $name.log)"
    else
        amend_last pass "$counts"
    fi
}

# The CUDA engines as "auto" would take them once they pass here (see docs/engines.md).
export GPUNN_AUTO_ENGINES=graph,fused,xp
stage cuda-suite 240 "$PY" -m pytest -m cuda -q -rs -p no:cacheprovider --junitxml "$OUT/cuda-suite.xml"
check_pytest cuda-suite 1

stage agreement 180 "$PY" -m pytest tests/test_cuda_agreement.py -m cuda -v -rs -p no:cacheprovider \
    --junitxml "$OUT/agreement.xml"
check_pytest agreement 0

stage nccl 120 "$PY" -m pytest tests/test_parallel.py -m cuda -k nccl -v -rs -p no:cacheprovider \
    --junitxml "$OUT/nccl.xml"
check_pytest nccl 0

RUN_ARGS=(--device cuda --engine graph --no-progress --out "$OUT/run")
[[ -n $DATA ]] && RUN_ARGS+=(--data-dir "$DATA")
stage run 300 "$PY" scripts/train_mnist.py "${RUN_ARGS[@]}"

if [[ ! -f benchmarks/bench_mnist.py ]]; then
    printf '\n=== bench: skipped, benchmarks/bench_mnist.py is absent\n'
    record bench skip 0 0 "benchmarks/bench_mnist.py is absent"
elif ! "$PY" -c "import torch" >/dev/null 2>&1; then
    printf '\n=== bench: skipped, PyTorch (its peer) is not installed: pip install "gpunn[bench]"\n'
    record bench skip 0 0 "PyTorch is not installed (pip install 'gpunn[bench]')"
else
    BENCH=(benchmarks/bench_mnist.py --device cuda --json "$OUT/bench.json" "${BENCH_ARGS[@]}")
    [[ -n $DATA ]] && BENCH+=(--data-dir "$DATA")
    stage bench 240 "$PY" "${BENCH[@]}"
fi

if command -v ncu >/dev/null 2>&1; then
    stage profile 180 ncu --profile-from-start off --print-summary per-kernel "$PY" benchmarks/profile_graph.py
else
    printf '\n=== profile: skipped, Nsight Compute (ncu) is not on PATH\n'
    record profile skip 0 0 "ncu is not on PATH"
fi

# --- summary -------------------------------------------------------------------------------------

SUMMARY_DATE=$(date -u +%Y-%m-%dT%H:%M:%SZ) GPU_QUERY=$GPU_QUERY DATA_DIR=$DATA BUDGET_S=$BUDGET \
    DRY_RUN=$DRY_RUN PYTHON_EXE=$(command -v "$PY") "$PY" - "$OUT" <<'EOF'
import json
import os
import platform
import sys
from pathlib import Path

out = Path(sys.argv[1])
stages = []
for line in (out / "stages.tsv").read_text().splitlines():
    name, status, code, seconds, note = (line.split("\t") + [""] * 5)[:5]
    log = out / f"{name}.log"
    stages.append({
        "name": name, "status": status, "exit_code": int(code), "seconds": float(seconds),
        "note": note, "log": log.name if log.exists() else None,
    })

query = os.environ["GPU_QUERY"].strip()
gpu = dict(zip(("name", "driver", "memory"), [s.strip() for s in query.split(",")])) if query else {}
cupy = {}
if (out / "cupy.json").exists():
    cupy = json.loads((out / "cupy.json").read_text())
    gpu.setdefault("name", cupy.get("device"))

run = None
metrics = out / "run" / "metrics.jsonl"
if metrics.exists():
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    if records:
        last = records[-1]
        run = {
            "final_val_error": last["val_error"],
            "final_val_error_percent": round(100 * last["val_error"], 2),
            "final_val_loss": last["val_loss"],
            "iterations": last["iteration"],
            "train_time_s": last["time_s"],
        }

summary = {
    "date": os.environ["SUMMARY_DATE"],
    "host": platform.node(),
    "dry_run": os.environ["DRY_RUN"] == "1",
    "python": f"{platform.python_version()} ({os.environ['PYTHON_EXE']})",
    "gpu": gpu or None,
    "cupy": cupy.get("cupy"),
    "cuda_runtime": cupy.get("cuda_runtime"),
    "cuda_driver": cupy.get("cuda_driver"),
    "first_kernels_s": cupy.get("first_kernels_s"),
    "data_dir": os.environ["DATA_DIR"] or None,
    "budget_s": int(os.environ["BUDGET_S"]),
    "stages": stages,
    "run": run,
    "passed": all(s["status"] in ("pass", "skip", "dry-run") for s in stages),
}
(out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")

print("\n=== summary")
print(f"{'stage':<12} {'status':<8} {'exit':>4} {'seconds':>8}  note")
for s in stages:
    print(f"{s['name']:<12} {s['status']:<8} {s['exit_code']:>4} {s['seconds']:>8.1f}  {s['note']}")
if gpu:
    print(f"GPU: {gpu.get('name')}, driver {gpu.get('driver')}; CuPy {cupy.get('cupy')}")
if run:
    print(f"Example 6.2: validation error {run['final_val_error_percent']:.2f} % after {run['iterations']} "
          f"iterations, {run['train_time_s']:.1f} s of training")
if summary["dry_run"]:
    verdict = "dry run: nothing was run"
else:
    verdict = "all stages passed" if summary["passed"] else "SOME STAGES FAILED"
print(f"{verdict}; written to {out / 'summary.json'}")
EOF
SUMMARY_RC=$?

((INTERRUPTED)) && exit 130
((SUMMARY_RC == 0)) || exit 1
if cut -f2 "$STAGES" | grep -qx fail; then
    exit 1
fi
exit 0
