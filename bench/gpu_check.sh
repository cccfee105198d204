#!/usr/bin/env bash
# The one prepared check for a (scarce, bare) GPU machine: run from the repository root with the
# machine's own python3 -- no venv, no pip, no FFCV, no DALI (the code imports without them).
#
#   bash bench/gpu_check.sh                 # everything lands in ./gpu-out; takes < 8 minutes
#   OUT=/tmp/x PYTHON=python3.11 bash bench/gpu_check.sh
#
# Steps: machine facts; `pytest -m gpu` (FFCV/DALI tests skip themselves); a small synthetic shard set
# (tar shards only: --formats wds, no .beton without FFCV); `bench train` of every variant on CUDA
# (resnet_plus50, 224 px) on synthetic tensors; the `all` variant fed by the resident loader (data-wait
# share); `bench loaders` resident + torch on CUDA; a 2-epoch training run with compile + channels_last
# + FP16; then a summary table (last thing printed). Every JSON and log goes under $OUT.
#
# Without a CUDA GPU every CUDA step says `SKIP: no CUDA GPU (...)` and runs instead as a tiny CPU
# smoke run of the same commands, so the script itself is tested on CPU machines (tests/test_bench.py).
# GPU_CHECK_QUICK=1 forces the tiny sizes on a GPU too.
#
# pytest is not part of a bare GPU machine's Python: `bash bench/gpu_check.sh --vendor-pytest DIR`
# copies the (pure-Python) pytest packages of the current python into DIR; ship DIR along and run with
# PYTHONPATH=DIR. Without pytest that step is skipped with a line saying so.
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

if [ "${1:-}" = "--vendor-pytest" ]; then
    dest=${2:?usage: bash bench/gpu_check.sh --vendor-pytest DIR}
    mkdir -p "$dest"
    "$PY" - "$dest" <<'EOF'
import importlib, pathlib, shutil, sys
dest = pathlib.Path(sys.argv[1])
for name in ("pytest", "_pytest", "pluggy", "iniconfig", "packaging", "py"):
    try:
        mod = importlib.import_module(name)
    except ImportError:
        continue
    src = pathlib.Path(mod.__file__)
    if src.name == "__init__.py":
        shutil.copytree(src.parent, dest / src.parent.name, dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns("__pycache__"))
    else:
        shutil.copy2(src, dest / src.name)
    print(f"copied {name}")
EOF
    exit $?
fi

OUT=${OUT:-./gpu-out}
mkdir -p "$OUT/logs"
OUT=$(cd "$OUT" && pwd)
STEPS="$OUT/steps.tsv"
: > "$STEPS"
# The repository root is the `cornpipe` package; without an install, a link named cornpipe makes it importable.
SHIM=$(mktemp -d "${TMPDIR:-/tmp}/cornpipe-path.XXXXXX")
ln -s "$PWD" "$SHIM/cornpipe"
trap 'rm -rf "$SHIM"' EXIT
export PYTHONPATH="$SHIM${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
BUDGET_S=${GPU_CHECK_BUDGET_S:-450}  # all steps together; the summary comes after
T_START=$(date +%s)

if ! "$PY" -c "import torch, torchvision, numpy, click, rich, PIL, sklearn, matplotlib" 2>"$OUT/logs/imports.log"; then
    echo "ERROR: $PY lacks a package this check needs:"; tail -n 1 "$OUT/logs/imports.log"; exit 2
fi

CUDA_INFO=$("$PY" -c "
import torch
if torch.cuda.is_available():
    print('yes', torch.cuda.get_device_name(0))
else:
    print('no', f'torch {torch.__version__}: torch.cuda.is_available() is False'
          + ('; a CPU-only build' if torch.version.cuda is None else ''))
")
if [ "${CUDA_INFO%% *}" = "yes" ]; then
    DEVICE=cuda; QUICK=${GPU_CHECK_QUICK:-0}; NO_GPU=""
    echo "CUDA GPU: ${CUDA_INFO#yes }"
else
    DEVICE=cpu; QUICK=1; NO_GPU="${CUDA_INFO#no }"
    echo "SKIP: no CUDA GPU ($NO_GPU): the CUDA measurements are skipped; each step runs as a tiny CPU smoke run"
fi

if [ "$QUICK" = "1" ]; then
    PER_SOURCE=4; SYNTH_PX=64; MAX_RES=64
    MODEL=resnet_plus_tiny; PX=32; BATCH=8; SECONDS_=0.5; REPEATS=1; WARMUP=1
    VARIANTS=${GPU_CHECK_VARIANTS:-eager-fp32,amp}   # compile takes ~20 s on a CPU even for a tiny net
    LOADER_VARIANT=amp
    RUN_MODEL=resnet_plus_tiny; RUN_BATCH=8; RUN_EPOCHS=1
else
    PER_SOURCE=100; SYNTH_PX=320; MAX_RES=256
    MODEL=resnet_plus50; PX=224; BATCH=256; SECONDS_=3; REPEATS=2; WARMUP=3
    VARIANTS=${GPU_CHECK_VARIANTS:-eager-fp32,channels_last,amp,compile,all}
    LOADER_VARIANT=all
    RUN_MODEL=resnet_plus18; RUN_BATCH=128; RUN_EPOCHS=2
fi
if [ "$DEVICE" = "cuda" ]; then
    RUN_FLAGS=(--compile --channels-last --amp fp16)
else
    RUN_FLAGS=(--no-compile --channels-last --amp bf16)  # FP16 autocast needs CUDA
fi
FAILED=0

# step NAME LIMIT_S COMMAND...: run with a time limit (also bounded by what is left of BUDGET_S),
# output to the terminal and $OUT/logs/NAME.log, one line in steps.tsv
step() {
    local name=$1 limit=$2; shift 2
    local left=$(( BUDGET_S - ($(date +%s) - T_START) ))
    if [ "$left" -lt 10 ]; then
        echo "SKIP: $name: the time budget (${BUDGET_S} s) is spent"
        printf '%s\tskip\t0\ttime budget spent\n' "$name" >> "$STEPS"; FAILED=$((FAILED + 1)); return 1
    fi
    [ "$left" -lt "$limit" ] && limit=$left
    echo "== $name (limit ${limit} s): $*"
    local t0=$(date +%s)
    timeout --kill-after=15 "$limit" "$@" 2>&1 | tee "$OUT/logs/$name.log"
    local rc=${PIPESTATUS[0]}
    local took=$(( $(date +%s) - t0 )) status=ok
    if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then status=timeout; elif [ "$rc" != 0 ]; then status="failed($rc)"; fi
    [ "$status" = ok ] || { FAILED=$((FAILED + 1)); echo "!! $name: $status (log: $OUT/logs/$name.log)"; }
    printf '%s\t%s\t%s\t%s\n' "$name" "$status" "$took" "${NOTE:-}" >> "$STEPS"
    [ "$status" = ok ]
}

skip_line() {  # the CUDA version of a step is not run here; say so, clearly
    [ -n "$NO_GPU" ] && echo "SKIP: no CUDA GPU ($NO_GPU): $1 on CUDA skipped; CPU smoke run instead"
    return 0
}

"$PY" -m cornpipe.bench.machine "$OUT/machine.json" > /dev/null

# 1. the GPU tests (FFCV/DALI tests skip themselves when the library is missing)
if "$PY" -c "import pytest" 2>/dev/null; then
    NOTE="" step pytest-gpu 120 "$PY" -m pytest -m gpu -q -p no:cacheprovider --junitxml="$OUT/pytest-gpu.xml" tests
    # exit status 5 = no test collected: not a failure of the check
    if tail -n 1 "$STEPS" | grep -q 'failed(5)'; then
        sed -i '$ s/failed(5)/ok/' "$STEPS"; FAILED=$((FAILED - 1))
    fi
else
    echo "SKIP: pytest is not installed for $PY (see --vendor-pytest in this script): GPU tests not run"
    printf 'pytest-gpu\tskip\t0\tpytest not installed\n' >> "$STEPS"
fi

# 2. a small synthetic shard set, tar shards only (no FFCV here)
DATA="$OUT/data"
NOTE="$DATA/shards" step data 120 bash -c '"$0" -m cornpipe synth "$1/raw" --per-source "$2" --image-size "$3" --seed 0 \
    --force && "$0" -m cornpipe convert "$1/raw" "$1/shards" --formats wds --max-resolution "$4" --force' \
    "$PY" "$DATA" $PER_SOURCE $SYNTH_PX $MAX_RES
HAVE_DATA=$?

# 3. training-step throughput of every variant, synthetic tensors on the device
skip_line "bench train (eager-fp32, channels_last, amp, compile, all; resnet_plus50, 224 px)"
NOTE="$OUT/bench_train.json" step bench-train 300 "$PY" -m cornpipe bench train --device "$DEVICE" --model $MODEL \
    --image-size $PX --batch-size $BATCH --variants "$VARIANTS" --warmup-steps $WARMUP --seconds $SECONDS_ \
    --repeats $REPEATS --json "$OUT/bench_train.json" --log-dir "$OUT/logs/bench-train"

if [ "$HAVE_DATA" = 0 ]; then
    # 4. the combined variant fed by the resident loader: the data-wait share
    skip_line "bench train (all; resident loader)"
    NOTE="$OUT/bench_train_loader.json" step bench-train-loader 120 "$PY" -m cornpipe bench train --device "$DEVICE" \
        --model $MODEL --image-size $PX --batch-size $BATCH --variants $LOADER_VARIANT --data loader --shards "$DATA/shards" \
        --loader resident --warmup-steps $WARMUP --seconds $SECONDS_ --repeats $REPEATS \
        --json "$OUT/bench_train_loader.json" --log-dir "$OUT/logs/bench-train-loader"

    # 5. loaders on the device: resident and the torch baseline, with the CPU decode ceiling
    skip_line "bench loaders (resident, torch)"
    NOTE="$OUT/bench_loaders.json" step bench-loaders 120 "$PY" -m cornpipe bench loaders "$DATA/shards" \
        --backends resident,torch --device "$DEVICE" --image-size $PX --batch-size $BATCH --seconds $SECONDS_ \
        --repeats $REPEATS --json "$OUT/bench_loaders.json" --log-dir "$OUT/logs/bench-loaders"

    # 6. a short real training run: compile + channels_last + FP16 on the resident loader
    skip_line "train (resnet_plus18, compile + channels_last + fp16)"
    NOTE="$OUT/run" step train-run 200 "$PY" -m cornpipe train "$DATA/shards" --out "$OUT/run" --force \
        --model $RUN_MODEL --loader resident --device "$DEVICE" "${RUN_FLAGS[@]}" --epochs $RUN_EPOCHS \
        --batch-size $RUN_BATCH --image-size $PX --bootstrap 200
else
    for name in bench-train-loader bench-loaders train-run; do
        echo "SKIP: $name: no shard set (the data step failed)"
        printf '%s\tskip\t0\tno shard set\n' "$name" >> "$STEPS"; FAILED=$((FAILED + 1))
    done
fi

# 7. the summary, printed last
"$PY" -m cornpipe.bench.summary "$OUT" --device "$DEVICE" ${NO_GPU:+--no-gpu "$NO_GPU"} --elapsed $(( $(date +%s) - T_START ))
[ "$FAILED" = 0 ]
