#!/usr/bin/env bash
# One-shot GPU check (issue 13), <= 8 minutes on one H200:
#
#   bash bench/build_wheels.sh          # here (network): fills bench/wheels/
#   bash bench/gpu_check.sh             # on the GPU machine (no registry): installs them, then measures
#
# Steps, each appending its JSON lines to the results file (default bench/results/h200.json,
# one JSON object keyed by step; a failed step records its error and the check goes on):
#   install   pip install --no-index --no-deps the carried wheels this Python lacks
#   imports   the torchrun worker path imports (no Ray, no MLflow)
#   train     (a) bench_train.py: engine tokens/s under ZeRO-2 and ZeRO-3 vs plain peft
#             (Qwen2.5-7B shape, random init, bf16, gradient checkpointing, seq 370, batch 2)
#   generate  (b) bench_generate.py: project generation vs HF default generate (7B shape,
#             184 prompts x 128 new tokens, as one evaluation of the VLSP split)
#   loop      (c) one short epoch of the real loop in bf16 through
#             torchrun -m ray_mtup.worker on a random-init Qwen2.5-1.5B-shaped checkpoint
#   speedups  bench_packing.py: padding-free packing and Liger's kernels, each against "off"
#             (Qwen2.5-1.5B shape, bf16; what is left of the budget, at most 70 s)
#   projection  7B full_training (10 epochs) minutes from (a) and (b), and the targets
#
# Environment:
#   GPU_CHECK_SHAPE=gpu|tiny    gpu (default): the Qwen2.5 shapes above; tiny: the tiny model (CPU test)
#   GPU_CHECK_DEVICE=cuda|cpu   default cuda
#   GPU_CHECK_SKIP_INSTALL=1    skip the wheel install (a venv that has everything)
#   GPU_CHECK_RESULTS=PATH      default bench/results/h200.json
#   GPU_CHECK_PYTHON=PATH       default python3 (the image's Python)
#   GPU_CHECK_BUDGET_S=N        the whole check's time limit, default 480
#   GPU_CHECK_WORK=DIR          scratch (checkpoint, run directory, logs); default a new temp dir
set -u
cd "$(dirname "$0")/.."
REPO=$PWD
SHAPE=${GPU_CHECK_SHAPE:-gpu}
DEVICE=${GPU_CHECK_DEVICE:-cuda}
RESULTS=${GPU_CHECK_RESULTS:-bench/results/h200.json}
PY=${GPU_CHECK_PYTHON:-python3}
BUDGET_S=${GPU_CHECK_BUDGET_S:-480}
WORK=${GPU_CHECK_WORK:-$(mktemp -d /tmp/gpu_check.XXXXXX)}
mkdir -p "$WORK" "$(dirname "$RESULTS")"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"  # the project runs from the carried tree
export TOKENIZERS_PARALLELISM=false
if [ "$DEVICE" = cuda ]; then export DS_ACCELERATOR=cuda; else export DS_ACCELERATOR=cpu; fi

if [ "$SHAPE" = tiny ]; then  # the CPU test: the same steps in a minute or two
    TRAIN_ARGS=(--model tiny --seq-len 64 --batch 2 --steps 2 --warmup-steps 1 --lora-r 8)
    GENERATE_ARGS=(--model tiny --n-prompts 8 --max-new-tokens 16 --batch-size 8 --hf-batch 8 --repeats 1)
    LOOP_SHAPE=tiny
    SPEEDUP_ARGS=(--model tiny --max-samples 32 --batch 4 --batches 2 --warmup 1 --rounds 1)
    CAPS=(install=60 imports=60 train=120 generate=90 loop=150 speedups=60)
else
    TRAIN_ARGS=(--model qwen2.5-7b --seq-len 370 --batch 2 --gradient-checkpointing --steps 8 --warmup-steps 2)
    GENERATE_ARGS=(--model qwen2.5-7b --n-prompts 184 --max-new-tokens 128 --batch-size 64 --hf-batch 64 --repeats 1)
    LOOP_SHAPE=qwen2.5-1.5b
    SPEEDUP_ARGS=(--model qwen2.5-1.5b --max-samples 256 --batch 8 --batches 6 --warmup 2 --rounds 1 --liger)
    CAPS=(install=45 imports=45 train=150 generate=110 loop=130 speedups=70)
fi
[ "$DEVICE" = cpu ] && GENERATE_ARGS+=(--device cpu --threads "$(nproc)")

# ---- Options of issue 13's other parts: switch these on once their branches land ------------
# (names as the issue gives them; check them against config.py / the bench scripts' --help)
LOOP_SET=(
    "eval_generation=auto"            # (1) replica: evaluation generation without the ZeRO-3 lockstep
    "zero_stage=auto"                 # (2) memplan: stage 2 when it fits, else 3
    "per_device_batch_size=auto"      # (3) memplan: micro-batch chosen for throughput
    "packing=true"                    # (4) packing: padding-free packing
    "liger_kernel=true"               # (4) packing: Liger fused linear cross-entropy
)
TRAIN_EXTRA=(
    # --packing --liger-kernel        # (4) if bench_train.py grows these switches
)
GENERATE_EXTRA=(
    # --static-cache --compile        # the static-cache variant (costs compile time)
)
# ----------------------------------------------------------------------------------------------

T0=$(date +%s)
stamp() { echo "[gpu_check $(date +%H:%M:%S) +$(( $(date +%s) - T0 ))s] $*"; }
cap() { local kv; for kv in "${CAPS[@]}"; do [ "${kv%%=*}" = "$1" ] && echo "${kv#*=}"; done; }

# step NAME CMD...: run CMD under the step's time cap (and what is left of the budget), then
# record its JSON lines, exit code and times in the results file.
step() {
    local name=$1; shift
    local left=$(( BUDGET_S - ($(date +%s) - T0) )) limit
    limit=$(cap "$name"); [ "$left" -lt "$limit" ] && limit=$left
    local out="$WORK/$name.out" err="$WORK/$name.err" started ended rc
    started=$(date +%s.%N)
    if [ "$limit" -le 5 ]; then
        echo "no time left of the ${BUDGET_S}s budget" >"$err"; : >"$out"; rc=124
    else
        stamp "$name: start (limit ${limit}s)"
        timeout --kill-after=15 "$limit" "$@" >"$out" 2>"$err"; rc=$?
    fi
    ended=$(date +%s.%N)
    "$PY" bench/gpu_check.py record --results "$RESULTS" --step "$name" --stdout "$out" --stderr "$err" \
        --rc "$rc" --started "$started" --ended "$ended" \
        || stamp "$name: could not record the step (see $out, $err)"
    grep -h '^{' "$out" || true
    [ "$rc" -eq 0 ] || { stamp "$name: FAILED (rc $rc)"; tail -n 15 "$err"; }
    stamp "$name: done (rc $rc)"
}

install_wheels() {
    local wheels
    wheels=$("$PY" bench/gpu_check.py wheels bench/wheels) || return 1
    if [ -z "$wheels" ]; then echo '{"bench": "install", "installed": []}'; return 0; fi
    # --no-deps: nothing may try to touch torch/transformers, which the image has. A system
    # Python (PEP 668) is allowed; where site-packages is not writable, the user site is used.
    # shellcheck disable=SC2086
    PIP_BREAK_SYSTEM_PACKAGES=1 "$PY" -m pip install --no-index --no-deps --find-links bench/wheels $wheels >&2 \
        || PIP_BREAK_SYSTEM_PACKAGES=1 "$PY" -m pip install --user --no-index --no-deps --find-links bench/wheels $wheels >&2 \
        || return 1
    "$PY" - "$wheels" <<'EOF'
import json, sys
print(json.dumps({"bench": "install", "installed": [w.rsplit("/", 1)[-1] for w in sys.argv[1].split()]}))
EOF
}

loop_step() {
    rm -rf "$WORK/checkpoint" "$WORK/run"
    "$PY" bench/gpu_check.py checkpoint --shape "$LOOP_SHAPE" --out "$WORK/checkpoint" --device "$DEVICE" || return 1
    "$PY" bench/gpu_check.py loop-config --checkpoint "$WORK/checkpoint" --out "$WORK/run.yaml" \
        --device "$DEVICE" ${LOOP_SET[@]+"${LOOP_SET[@]/#/--set=}"} || return 1
    "$PY" -m torch.distributed.run --standalone --nproc_per_node 1 \
        -m ray_mtup.worker --config "$WORK/run.yaml" --output "$WORK/run" \
        --device "$([ "$DEVICE" = cuda ] && echo gpu || echo cpu)" >&2 || return 1
    "$PY" bench/gpu_check.py loop-record "$WORK/run"
}

case "${1:-}" in  # the steps that are shell functions, run by `step` as `bash gpu_check.sh __NAME`
    __install) install_wheels; exit $? ;;
    __loop) loop_step; exit $? ;;
esac
export GPU_CHECK_WORK=$WORK

stamp "shape $SHAPE, device $DEVICE, results $RESULTS, scratch $WORK, budget ${BUDGET_S}s"
"$PY" bench/gpu_check.py env --results "$RESULTS" --shape "$SHAPE" --device "$DEVICE" \
    || stamp "env: could not write $RESULTS"
if [ "${GPU_CHECK_SKIP_INSTALL:-0}" = 1 ]; then
    stamp "install: skipped (GPU_CHECK_SKIP_INSTALL=1)"
else
    step install bash "$REPO/bench/gpu_check.sh" __install
fi
step imports "$PY" bench/gpu_check.py imports
step train "$PY" -m torch.distributed.run --standalone --nproc_per_node 1 bench/bench_train.py \
    "${TRAIN_ARGS[@]}" ${TRAIN_EXTRA[@]+"${TRAIN_EXTRA[@]}"}
step generate "$PY" bench/bench_generate.py "${GENERATE_ARGS[@]}" ${GENERATE_EXTRA[@]+"${GENERATE_EXTRA[@]}"}
step loop bash "$REPO/bench/gpu_check.sh" __loop
step speedups "$PY" bench/bench_packing.py "${SPEEDUP_ARGS[@]}"
"$PY" bench/gpu_check.py project --results "$RESULTS" || stamp "projection: failed"
stamp "finished; results in $RESULTS"
