#!/usr/bin/env bash
# The one prepared check for a (scarce, bare) GPU machine: run it from the repository root with the
# machine's own python3 -- no venv, no pip, no FFCV, no DALI (the code imports without them).
#
#   OUT=/path/to/out bash bench/gpu_check.sh          # default OUT: ./gpu-out
#   bash bench/gpu_check.sh --step NAME LIMIT_S CMD... # one command under the same step runner
#
# Steps, in this order, each under its own time limit; a step that fails or times out is recorded
# and the next one runs:
#   data           synthetic shard set, tar shards only (900 images, 256 px; 720 train / 180 val)
#   train-run      the end-to-end run: `cornpipe train` on the resident loader, compile + FP16 +
#                  channels_last, resnet_plus18, 224 px, batch 90 (no partial batch: no recompile), 2 epochs
#   bench-train    training-step img/s of resnet_plus50, 224 px, batch 256 on synthetic tensors:
#                  eager-fp32 (the baseline), amp, all (= compile + amp + channels_last: the one compile;
#                  each variant a process of at most 110 s, so a cold compile past that loses only `all`)
#   bench-loaders  resident and torch loaders on CUDA, with the CPU decode ceiling
#   pytest-gpu     `pytest -m gpu -v` (exit 5, nothing collected, is not a success: "no tests collected");
#                  killed before its junit file, the summary counts the per-test lines of its log
#
# On CUDA a compile preflight comes first: one tiny torch.compile'd function on the GPU (Triton needs a C
# compiler and Python.h at the first compiled kernel, which importing it does not show). When it fails,
# train-run uses --no-compile and bench-train drops `all`, with a line saying so.
#
# What comes back: $OUT receives at most 8 small files, written at the end (bench/summary.py; steps.tsv
# also after every step, so a check killed from outside still returns its step table):
# summary.json (every figure, every step's status, machine facts), steps.tsv, bench_train.json,
# bench_loaders.json, run_metrics.jsonl, pytest.xml, log_tail.txt. Data, checkpoints and the full logs
# stay in a scratch folder outside $OUT (removed at exit; GPU_CHECK_SCRATCH=DIR keeps them in DIR).
# The summary printed last is at most 4,000 characters.
#
# Time: all steps share GPU_CHECK_BUDGET_S (default 540 s: a lent GPU run may take 600 s). The limits add
# up to the budget less 35 s of prelude, so on a GPU machine every step gets its whole limit; where the
# prelude is slower, each step still leaves the later ones their minimum (train-run 100, bench-train 120,
# bench-loaders 30, pytest-gpu 90 s). The script ends by ~555 s (budget + the last step's kill grace +
# summary) even when every step hits its limit.
# Measured CPU smoke run (2-core VM, no GPU, the tiny sizes): 85 s in all (data 10, train-run 8,
# bench-train 23, bench-loaders 20, pytest-gpu 12 s, the rest start-up and summary).
# Estimated on one H100/H200 (16 cores), from the step sizes (limits in brackets):
#   prelude (import torch twice, CUDA init, machine facts), compile preflight        ~10 + ~15 s
#   data: 36 s for these 900 images on 2 CPU cores here, ~7 s on 16                  ~10 s   [35]
#   train-run: process start + CUDA init 10 s; cold compile of resnet_plus18 fwd+bwd (72-85 s on
#     a CPU alone) and of its eval forward; 2 x (8 + 2) steps of 90 images; report + plots 5 s ~100 s [140]
#   bench-train: 3 fresh processes x (start 10 s + 3 warm-up steps + 2 windows x 2 s) = ~50 s,
#     plus one cold compile of resnet_plus50 fwd+bwd (up to the 110 s a variant may take)      ~130 s [160]
#   bench-loaders: 2 backends + ceiling, fresh processes x (start 8 s + setup + 2 s)             ~35 s  [60]
#   pytest-gpu: collection ~10 s; tests/runs/test_gpu_train.py (tiny model: one cold compile
#     ~25 s, resume and predict ~10 s); the other gpu tests ~50 s                                ~95 s [110]
#   summary                                                                                      ~3 s
#   => ~400 s; hard ceiling ~555 s.
#
# Without a CUDA GPU every CUDA step says `SKIP: no CUDA GPU (...)` and runs as a tiny CPU smoke run
# of the same commands, so the script itself is tested on CPU machines (tests/bench/test_bench.py).
# GPU_CHECK_QUICK=1 forces the tiny sizes on a GPU too.
#
# A step's time limit ends its whole process tree: every process a step starts inherits the marker
# CORNPIPE_GPU_CHECK_STEP=<token> in its environment, and after the step (ok or not) every process
# still carrying it is sent SIGTERM, then SIGKILL -- also children that started their own session
# (the benchmarks' isolated children) or whose parent died. Nothing holds a pipe to this script.
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
T_START=$(date +%s)
BUDGET_S=${GPU_CHECK_BUDGET_S:-540}
DEADLINE=$(( T_START + BUDGET_S ))

# ---------------------------------------------------------------------------------------------
# the step runner

marked() {  # pids of the processes that carry the step marker $1 (any session, group or parent)
    grep -lsxz -- "CORNPIPE_GPU_CHECK_STEP=$1" /proc/[0-9]*/environ 2>/dev/null | cut -d/ -f3
}

sweep() {  # end every process of step token $1: SIGTERM, up to 3 s, then SIGKILL
    local pids i
    pids=$(marked "$1")
    [ -z "$pids" ] && return 0
    echo "   ending $(echo $pids | wc -w) leftover process(es) of $2"
    kill -TERM $pids 2>/dev/null
    for i in 1 2 3 4 5 6; do
        sleep 0.5
        pids=$(marked "$1")
        [ -z "$pids" ] && return 0
    done
    kill -KILL $pids 2>/dev/null
    sleep 0.2
}

record() {  # NAME STATUS SECONDS NOTE -> one line of steps.tsv
    printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >> "$STEPS"
    [ -n "${OUT_DIR:-}" ] && cp "$STEPS" "$OUT_DIR/steps.tsv"  # survives a kill from outside
    return 0
}

# step NAME LIMIT_S RESERVE_S COMMAND...: run COMMAND for at most LIMIT_S, and never into the
# RESERVE_S seconds of the budget kept for the steps after it. Output goes to $LOGS/NAME.log (its
# tail is printed); one line goes to steps.tsv. Returns 0 when the step is ok.
step() {
    local name=$1 limit=$2 reserve=$3; shift 3
    local left=$(( DEADLINE - $(date +%s) - reserve ))
    if [ "$left" -lt 10 ]; then
        echo "SKIP: $name: the time budget (${BUDGET_S} s) is spent"
        record "$name" skip 0 "time budget spent"; FAILED=$((FAILED + 1)); return 1
    fi
    [ "$left" -lt "$limit" ] && limit=$left
    echo "== $name (limit ${limit} s): $*"
    local token="cornpipe-gpu-check-$$-$name-$RANDOM" log="$LOGS/$name.log" t0 rc took status note=""
    t0=$(date +%s)
    CORNPIPE_GPU_CHECK_STEP=$token timeout --kill-after=5 "$limit" "$@" > "$log" 2>&1 < /dev/null
    rc=$?
    sweep "$token" "$name"
    took=$(( $(date +%s) - t0 ))
    status=ok
    if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
        status=timeout; note="no result after ${limit} s"
    elif [ "$rc" = 5 ] && [ "${name#pytest}" != "$name" ]; then
        status="no tests collected"; note="pytest exit 5"
    elif [ "$rc" != 0 ]; then
        status=failed; note="exit $rc: $(grep -v '^\s*$' "$log" | tail -n 1 | cut -c1-200)"
    fi
    if [ "$status" = ok ]; then
        tail -n 8 "$log" | cut -c1-240
    else
        FAILED=$((FAILED + 1))
        tail -n 25 "$log" | cut -c1-240
        echo "!! $name: $status ($note)"
    fi
    record "$name" "$status" "$took" "$note"
    [ "$status" = ok ]
}

setup_scratch() {
    if [ -n "${GPU_CHECK_SCRATCH:-}" ]; then
        SCRATCH=$GPU_CHECK_SCRATCH; mkdir -p "$SCRATCH"; KEEP_SCRATCH=1
    else
        SCRATCH=$(mktemp -d "${TMPDIR:-/tmp}/cornpipe-gpu-check.XXXXXX"); KEEP_SCRATCH=0
    fi
    SCRATCH=$(cd "$SCRATCH" && pwd)
    LOGS="$SCRATCH/logs"; STEPS="$SCRATCH/steps.tsv"
    mkdir -p "$LOGS"; : > "$STEPS"
    # The repository root is the `cornpipe` package; without an install, a link named cornpipe makes it importable.
    SHIM=$(mktemp -d "${TMPDIR:-/tmp}/cornpipe-path.XXXXXX")
    ln -s "$PWD" "$SHIM/cornpipe"
    trap 'rm -rf "$SHIM"; [ "$KEEP_SCRATCH" = 1 ] || rm -rf "$SCRATCH"' EXIT
    export PYTHONPATH="$SHIM${PYTHONPATH:+:$PYTHONPATH}"
    export PYTHONUNBUFFERED=1
}
FAILED=0

if [ "${1:-}" = "--step" ]; then  # one command under the step runner, e.g. to rerun a step by hand
    [ $# -ge 4 ] || { echo "usage: bash bench/gpu_check.sh --step NAME LIMIT_S COMMAND..."; exit 2; }
    name=$2 limit=$3; shift 3
    DEADLINE=$(( $(date +%s) + limit + 60 ))
    setup_scratch
    step "$name" "$limit" 0 "$@"
    rc=$?
    cut -f1-4 "$STEPS"
    exit $rc
fi

# ---------------------------------------------------------------------------------------------
# the check

OUT=${OUT:-./gpu-out}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
setup_scratch
OUT_DIR=$OUT
echo "scratch (data, checkpoints, full logs): $SCRATCH; results: $OUT"

if ! timeout 120 "$PY" -c "import torch, torchvision, numpy, click, rich, PIL, sklearn, matplotlib" \
        2>"$LOGS/imports.log"; then
    echo "ERROR: $PY lacks a package this check needs:"; tail -n 1 "$LOGS/imports.log"; exit 2
fi

CUDA_INFO=$(timeout 120 "$PY" -c "
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
    RUN_MODEL=resnet_plus_tiny; RUN_PX=32; RUN_BATCH=8; RUN_EPOCHS=2
    MODEL=resnet_plus_tiny; PX=32; BATCH=8; SECONDS_=0.5; REPEATS=2; WARMUP=1
    VARIANTS=${GPU_CHECK_VARIANTS:-eager-fp32,amp}   # compile takes ~20 s on a CPU even for a tiny net
    LOADER_PX=32; LOADER_BATCH=8; LOADER_SECONDS=0.5
else
    PER_SOURCE=100; SYNTH_PX=256; MAX_RES=256        # 900 images: 720 train / 180 val (split seed 0)
    RUN_MODEL=resnet_plus18; RUN_PX=224; RUN_BATCH=90; RUN_EPOCHS=2  # 8 + 2 full batches an epoch
    MODEL=resnet_plus50; PX=224; BATCH=256; SECONDS_=2; REPEATS=2; WARMUP=3
    VARIANTS=${GPU_CHECK_VARIANTS:-eager-fp32,amp,all}  # `all` is the only compiled variant
    LOADER_PX=224; LOADER_BATCH=128; LOADER_SECONDS=2
fi
if [ "$DEVICE" = "cuda" ]; then
    RUN_FLAGS=(--compile --channels-last --amp fp16)
    # the first compiled kernel needs Triton, a C compiler and Python.h: try one before the runs rely on it
    if timeout 120 "$PY" -c "
import torch
f = torch.compile(lambda x: torch.sin(x) * 2 + 1)
x = torch.randn(1000, device='cuda')
assert torch.allclose(f(x), torch.sin(x) * 2 + 1)
" > "$LOGS/compile-preflight.log" 2>&1; then
        echo "compile preflight: a compiled kernel ran on CUDA"
    else
        echo "NO COMPILE: a compiled kernel failed on CUDA ($(grep -v '^\s*$' "$LOGS/compile-preflight.log" | tail -n 1 \
            | cut -c1-200)): train-run uses --no-compile, bench-train drops its compiled variant \`all\`"
        record compile-preflight failed 0 "compiled kernel failed: train-run --no-compile, bench-train without all"
        FAILED=$((FAILED + 1))
        RUN_FLAGS=(--no-compile --channels-last --amp fp16)
        VARIANTS=$(echo ",$VARIANTS," | sed 's/,all,/,/g; s/^,//; s/,$//')
    fi
else
    RUN_FLAGS=(--no-compile --channels-last --amp bf16)  # FP16 autocast needs CUDA
fi

skip_line() {  # the CUDA version of a step is not run here; say so, clearly
    [ -n "$NO_GPU" ] && echo "SKIP: no CUDA GPU ($NO_GPU): $1 on CUDA skipped; CPU smoke run instead"
    return 0
}

timeout 60 "$PY" -m cornpipe.bench.machine "$SCRATCH/machine.json" > /dev/null 2>"$LOGS/machine.log"

# 1. a small synthetic shard set, tar shards only (no FFCV here)
DATA="$SCRATCH/data"
step data 35 340 bash -c '"$0" -m cornpipe synth "$1/raw" --per-source "$2" --image-size "$3" --seed 0 \
    --force && "$0" -m cornpipe convert "$1/raw" "$1/shards" --formats wds --max-resolution "$4" --force' \
    "$PY" "$DATA" $PER_SOURCE $SYNTH_PX $MAX_RES
HAVE_DATA=$?

# 2. the end-to-end training run: resident loader, compile + channels_last + FP16, 2 short epochs
skip_line "train (resnet_plus18, compile + channels_last + fp16)"
if [ "$HAVE_DATA" = 0 ]; then
    step train-run 140 240 "$PY" -m cornpipe train "$DATA/shards" --out "$SCRATCH/run" --force \
        --model $RUN_MODEL --loader resident --device "$DEVICE" "${RUN_FLAGS[@]}" --epochs $RUN_EPOCHS \
        --batch-size $RUN_BATCH --image-size $RUN_PX --bootstrap 200
else
    echo "SKIP: train-run: no shard set (the data step failed)"; record train-run skip 0 "no shard set"
    FAILED=$((FAILED + 1))
fi

# 3. training-step throughput, synthetic tensors on the device; one compiled variant at most
skip_line "bench train (eager-fp32, amp, all; resnet_plus50, 224 px)"
step bench-train 160 120 "$PY" -m cornpipe bench train --device "$DEVICE" --model $MODEL \
    --image-size $PX --batch-size $BATCH --variants "$VARIANTS" --warmup-steps $WARMUP --seconds $SECONDS_ \
    --repeats $REPEATS --timeout 110 --json "$SCRATCH/bench_train.json" --log-dir "$LOGS/bench-train"

# 4. loaders on the device: resident and the torch baseline, with the CPU decode ceiling
skip_line "bench loaders (resident, torch)"
if [ "$HAVE_DATA" = 0 ]; then
    step bench-loaders 60 90 "$PY" -m cornpipe bench loaders "$DATA/shards" --backends resident,torch \
        --device "$DEVICE" --image-size $LOADER_PX --batch-size $LOADER_BATCH --seconds $LOADER_SECONDS \
        --repeats 1 --timeout 55 --json "$SCRATCH/bench_loaders.json" --log-dir "$LOGS/bench-loaders"
else
    echo "SKIP: bench-loaders: no shard set (the data step failed)"; record bench-loaders skip 0 "no shard set"
    FAILED=$((FAILED + 1))
fi

# 5. the GPU tests (FFCV/DALI tests skip themselves when the library is missing)
if timeout 60 "$PY" -c "import pytest" 2>/dev/null; then
    step pytest-gpu 110 0 "$PY" -m pytest -m gpu -v -p no:cacheprovider --junitxml="$SCRATCH/pytest.xml" \
        --basetemp="$SCRATCH/pytest-tmp" tests
else
    echo "SKIP: pytest is not installed for $PY: GPU tests not run"
    record pytest-gpu skip 0 "pytest not installed"; FAILED=$((FAILED + 1))
fi

# 6. $OUT gets its few files, and the summary is printed last
ELAPSED=$(( $(date +%s) - T_START ))
if ! timeout 60 "$PY" -m cornpipe.bench.summary "$SCRATCH" "$OUT" --device "$DEVICE" \
        ${NO_GPU:+--no-gpu "$NO_GPU"} --elapsed "$ELAPSED" 2>"$LOGS/summary.log"; then
    # the summary itself failed: bring back at least the step table and the log tails, raw
    cp "$STEPS" "$OUT/steps.tsv"
    for f in "$LOGS"/*.log; do echo "==> $f"; tail -n 60 "$f" | cut -c1-300; done | tail -c 2000000 \
        > "$OUT/log_tail.txt"
    tail -n 20 "$LOGS/summary.log"
    cat "$STEPS"
    echo "RESULT: the summary failed (bench/summary.py); $FAILED step(s) not ok in $ELAPSED s"
    exit 1
fi
[ "$FAILED" = 0 ]
