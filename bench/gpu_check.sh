#!/usr/bin/env bash
# One-shot GPU check: every figure from one call, <= 420 s of step caps (8 minutes with start-up).
#
#   bash bench/build_wheels.sh          # here (package registry): fills bench/wheels/ and its MANIFEST
#   bash bench/gpu_check.sh             # on the GPU machine (no registry; bench/wheels travels with the tree)
#
# Steps, in order; each is recorded in the results file as soon as it ends (its JSON lines, exit
# code, times and, when it failed, the tail of its standard error), so a check cut off by its time
# limit still returns every finished step:
#   install     pip install --no-index --no-deps --target $WORK/site the carried wheels this Python
#               lacks; fails, naming them, when bench/wheels or any wheel of its MANIFEST is missing
#   imports     the torchrun worker path imports (no Ray, no MLflow)
#   train       bench_train.py on the 7B shape at the memory plan's ZeRO stage and micro-batch for this
#               device (global batch 16, planned at 1,024 tokens, timed at 256), the loop's engine path
#               (HfDeepSpeedConfig alive, zero.Init under ZeRO-3), against plain peft at the same micro-batch
#   generate    bench_generate.py on the 7B shape: the evaluation path (length-sorted batches, step-2
#               stopping rule) against HF's default generate, 184 validation prompts, each row ended at the
#               length of a real completion of the corpus (--real-lengths)
#   checkpoint  a random-init Qwen2.5-1.5B-shaped checkpoint directory (the loop steps load it)
#   loop        one short epoch of the real loop, torchrun -m ray_mtup.worker, with every option as a user
#               gets it (zero_stage, micro-batch and eval_generation auto; packing and Liger on)
#   replica     the same under ZeRO-3 (zero.Init load) with eval_generation=replica, one epoch, on 2 ranks
#               (2 GPUs, or 2 CPU processes in tiny mode); on a 1-GPU machine one rank, whose whole
#               model generates in place (the record's eval_generation says "plain")
#   resume      the replica run continued to epoch 2 from its checkpoint (a fresh torchrun)
#   speedups    bench_packing.py: padding-free packing and Liger's kernels, each against "off"
#   projection  7B full_training (10 epochs with evaluation) from train and generate, with its arithmetic
#
# Where results go: with $OUT set (the GPU machine), $OUT/gpu_check.json (results) and
# $OUT/gpu_check.log (this script's lines, then each step's output as it ends); without it,
# bench/results/h200.json and $WORK/gpu_check.log. Scratch (checkpoints, runs, site) stays in $WORK.
#
# Environment:
#   GPU_CHECK_SHAPE=gpu|tiny    gpu (default): the shapes above; tiny: the tiny model (the CPU test)
#   GPU_CHECK_DEVICE=cuda|cpu   default cuda
#   GPU_CHECK_STEPS=a,b         run only these steps (default: all); the projection always runs
#   GPU_CHECK_SKIP_INSTALL=1    skip the wheel install (a venv that has everything)
#   GPU_CHECK_WHEELS=DIR        default bench/wheels
#   GPU_CHECK_RESULTS=PATH      default $OUT/gpu_check.json, else bench/results/h200.json
#   GPU_CHECK_PYTHON=PATH       default python3 (the image's Python)
#   GPU_CHECK_BUDGET_S=N        the whole check's time limit, default 420 (tiny: 1800)
#   GPU_CHECK_WORK=DIR          scratch; default a new temp dir
set -u
cd "$(dirname "$0")/.."
REPO=$PWD
SHAPE=${GPU_CHECK_SHAPE:-gpu}
DEVICE=${GPU_CHECK_DEVICE:-cuda}
OUTDIR=${OUT:-}
if [ -n "$OUTDIR" ]; then DEFAULT_RESULTS=$OUTDIR/gpu_check.json; else DEFAULT_RESULTS=bench/results/h200.json; fi
RESULTS=${GPU_CHECK_RESULTS:-$DEFAULT_RESULTS}
WHEELS=${GPU_CHECK_WHEELS:-bench/wheels}
PY=${GPU_CHECK_PYTHON:-python3}
if [ "$SHAPE" = tiny ]; then BUDGET_S=${GPU_CHECK_BUDGET_S:-1800}; else BUDGET_S=${GPU_CHECK_BUDGET_S:-420}; fi
STEPS=${GPU_CHECK_STEPS:-}
WORK=${GPU_CHECK_WORK:-$(mktemp -d /tmp/gpu_check.XXXXXX)}
mkdir -p "$WORK" "$(dirname "$RESULTS")"
LOG=${OUTDIR:+$OUTDIR/gpu_check.log}
LOG=${LOG:-$WORK/gpu_check.log}
SITE=$WORK/site  # where the carried wheels are installed (never the image's own site-packages)
# The project runs from the carried tree; the carried wheels come before the image's packages.
export PYTHONPATH="$REPO:$SITE${PYTHONPATH:+:$PYTHONPATH}"
export TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
if [ "$DEVICE" = cuda ]; then export DS_ACCELERATOR=cuda; else export DS_ACCELERATOR=cpu; fi

if [ "$SHAPE" = tiny ]; then  # the CPU test: the same steps in a minute or two
    TRAIN_ARGS=(--model tiny --seq-len 64 --plan-seq-len 64 --global-batch 4 --micro-batches auto --with-plain
                --steps 1 --warmup-steps 1 --lora-r 8)
    GENERATE_ARGS=(--model tiny --n-prompts 8 --max-new-tokens 16 --batch-size 8 --hf-batch 8 --repeats 1 --real-lengths)
    LOOP_SHAPE=tiny
    SPEEDUP_ARGS=(--model tiny --max-samples 32 --batch 4 --batches 2 --warmup 1 --rounds 1)
    # generous: the CPU test runs on shared 2-core machines (GPU_CHECK_BUDGET_S defaults to 1800 here)
    CAPS=(install=60 imports=180 train=240 generate=180 checkpoint=120 loop=300 replica=300 resume=300 speedups=180)
else
    TRAIN_ARGS=(--model qwen2.5-7b --seq-len 256 --plan-seq-len 1024 --global-batch 16 --micro-batches auto
                --with-plain --steps 3 --warmup-steps 1)
    GENERATE_ARGS=(--model qwen2.5-7b --n-prompts 184 --max-new-tokens 384 --hf-batch 64 --repeats 1 --real-lengths)
    LOOP_SHAPE=qwen2.5-1.5b
    SPEEDUP_ARGS=(--model qwen2.5-1.5b --max-samples 128 --batch 8 --batches 4 --warmup 1 --rounds 1 --liger)
    # 15 + 20 + 90 + 75 + 20 + 75 + 55 + 40 + 30 = 420 s
    CAPS=(install=15 imports=20 train=90 generate=75 checkpoint=20 loop=75 replica=55 resume=40 speedups=30)
fi
[ "$DEVICE" = cpu ] && GENERATE_ARGS+=(--device cpu --threads "$(nproc)")

# The loop step's options, as a user's run resolves them (auto) with the speed-ups on; the replica
# step forces the ZeRO-3 path (zero.Init load, LoRA-merged replica evaluation).
LOOP_SET=(eval_generation=auto zero_stage=auto per_device_batch_size=auto packing=true liger_kernel=true)
REPLICA_SET=(eval_generation=replica zero_stage=3 per_device_batch_size=auto)

T0=$(date +%s)
stamp() { echo "[gpu_check $(date +%H:%M:%S) +$(( $(date +%s) - T0 ))s] $*" | tee -a "$LOG"; }
cap() { local kv; for kv in "${CAPS[@]}"; do [ "${kv%%=*}" = "$1" ] && echo "${kv#*=}"; done; }
wanted() { [ -z "$STEPS" ] || [[ ",$STEPS," == *",$1,"* ]]; }

# step NAME CMD...: run CMD under the step's time cap (and what is left of the budget), then
# record its JSON lines, exit code and times in the results file, and append its output to the log.
step() {
    local name=$1; shift
    wanted "$name" || return 0
    local left=$(( BUDGET_S - ($(date +%s) - T0) )) limit
    limit=$(cap "$name"); [ "$left" -lt "$limit" ] && limit=$left
    local out="$WORK/$name.out" err="$WORK/$name.err" started ended rc
    started=$(date +%s.%N)
    if [ "$limit" -le 5 ]; then
        echo "no time left of the ${BUDGET_S}s budget" >"$err"; : >"$out"; rc=124
    else
        stamp "$name: start (limit ${limit}s)"
        timeout --kill-after=10 "$limit" "$@" >"$out" 2>"$err"; rc=$?
    fi
    ended=$(date +%s.%N)
    "$PY" bench/gpu_check.py record --results "$RESULTS" --step "$name" --stdout "$out" --stderr "$err" \
        --rc "$rc" --started "$started" --ended "$ended" \
        || stamp "$name: could not record the step (see $out, $err)"
    { echo "---- $name: stdout"; cat "$out"; echo "---- $name: stderr (last 200 lines)"; tail -n 200 "$err"; } >>"$LOG"
    grep -h '^{' "$out" || true
    [ "$rc" -eq 0 ] || { stamp "$name: FAILED (rc $rc)"; tail -n 15 "$err"; }
    stamp "$name: done (rc $rc)"
}

install_wheels() {
    local wheels
    "$PY" bench/gpu_check.py check-wheels "$WHEELS" || return 1
    wheels=$("$PY" bench/gpu_check.py wheels "$WHEELS") || return 1
    if [ -n "$wheels" ]; then
        # --no-deps: nothing may touch torch/transformers, which the image has; --target: the
        # image's site-packages are left as they are (PYTHONPATH above puts $SITE first).
        # shellcheck disable=SC2086
        "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$SITE" $wheels >&2 || return 1
    fi
    "$PY" bench/gpu_check.py installed "$WHEELS" $wheels
}

# The replica path needs 2 ranks: 2 GPUs where there are, 2 gloo processes on the CPU.
if [ "$DEVICE" = cpu ]; then REPLICA_NPROC=2
else REPLICA_NPROC=$(nvidia-smi -L 2>/dev/null | wc -l); [ "$REPLICA_NPROC" -gt 2 ] && REPLICA_NPROC=2
     [ "$REPLICA_NPROC" -lt 1 ] && REPLICA_NPROC=1; fi

# run_loop NAME EPOCHS NPROC SET...: the real loop (torchrun -m ray_mtup.worker) on the step's
# checkpoint, into $WORK/NAME (a run directory that a later call continues from its checkpoint).
run_loop() {
    local run=$1 epochs=$2 nproc=$3; shift 3
    "$PY" bench/gpu_check.py loop-config --checkpoint "$WORK/checkpoint" --out "$WORK/$run.yaml" \
        --device "$DEVICE" --set "epochs=$epochs" "${@/#/--set=}" || return 1
    "$PY" -m torch.distributed.run --standalone --nproc_per_node "$nproc" \
        -m ray_mtup.worker --config "$WORK/$run.yaml" --output "$WORK/$run" \
        --device "$([ "$DEVICE" = cuda ] && echo gpu || echo cpu)" >&2 || return 1
    "$PY" bench/gpu_check.py loop-record "$WORK/$run" --config "$WORK/$run.yaml"
}

case "${1:-}" in  # the steps that are shell functions, run by `step` as `bash gpu_check.sh __NAME`
    __install) install_wheels; exit $? ;;
    __checkpoint) rm -rf "$WORK/checkpoint"
        "$PY" bench/gpu_check.py checkpoint --shape "$LOOP_SHAPE" --out "$WORK/checkpoint" --device "$DEVICE"
        exit $? ;;
    __loop) rm -rf "$WORK/loop"; run_loop loop 1 1 "${LOOP_SET[@]}"; exit $? ;;
    __replica) rm -rf "$WORK/replica"; run_loop replica 1 "$REPLICA_NPROC" "${REPLICA_SET[@]}" "num_workers=$REPLICA_NPROC"
        exit $? ;;
    __resume) [ -d "$WORK/replica" ] || { echo "no replica run to resume (the replica step did not run)" >&2; exit 1; }
        run_loop replica 2 "$REPLICA_NPROC" "${REPLICA_SET[@]}" "num_workers=$REPLICA_NPROC"; exit $? ;;
esac
export GPU_CHECK_WORK=$WORK

stamp "shape $SHAPE, device $DEVICE, results $RESULTS, log $LOG, scratch $WORK, budget ${BUDGET_S}s"
"$PY" bench/gpu_check.py env --results "$RESULTS" --shape "$SHAPE" --device "$DEVICE" --caps "${CAPS[@]}" \
    || stamp "env: could not write $RESULTS"
if [ "${GPU_CHECK_SKIP_INSTALL:-0}" = 1 ]; then
    stamp "install: skipped (GPU_CHECK_SKIP_INSTALL=1)"
else
    step install bash "$REPO/bench/gpu_check.sh" __install
fi
step imports "$PY" bench/gpu_check.py imports
step train "$PY" -m torch.distributed.run --standalone --nproc_per_node 1 bench/bench_train.py "${TRAIN_ARGS[@]}"
step generate "$PY" bench/bench_generate.py "${GENERATE_ARGS[@]}"
step checkpoint bash "$REPO/bench/gpu_check.sh" __checkpoint
step loop bash "$REPO/bench/gpu_check.sh" __loop
step replica bash "$REPO/bench/gpu_check.sh" __replica
step resume bash "$REPO/bench/gpu_check.sh" __resume
step speedups "$PY" bench/bench_packing.py "${SPEEDUP_ARGS[@]}"
"$PY" bench/gpu_check.py project --results "$RESULTS" | tee -a "$LOG" || stamp "projection: failed"
stamp "finished; results in $RESULTS, log in $LOG"
