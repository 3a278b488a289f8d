#!/usr/bin/env bash
# Fill bench/wheels/ with what the GPU check's image lacks (CPython 3.12, manylinux x86_64):
#
#   bash bench/build_wheels.sh          # here, with the package registry; then bench/gpu_check.sh there
#
# The image has torch, transformers, peft, accelerate and triton (and their deps: numpy, packaging,
# psutil, pyyaml, safetensors, tokenizers, filelock, tqdm); none of those is carried. Carried:
# DeepSpeed built from its sdist with DS_BUILD_OPS=0 (pure Python; the project's optimizer is
# torch's AdamW, so no op is ever compiled) and its deps, pydantic with its compiled core, and
# the project's own deps (penman, smatch, bm25s, llguidance, liger-kernel). MLflow, tensorboardX
# and Ray stay out: the torchrun worker path imports none of them. The project itself is not
# carried as a wheel: it runs from the working tree (PYTHONPATH), which is copied to the GPU machine.
# Every wheel is pinned: at the build venv's version (the ones the tests run against), or, for
# what the CPU venv lacks, at the version in PINS below. bench/wheels/MANIFEST lists each carried
# wheel as name==version; gpu_check.sh's install step fails, naming them, when any is missing. The
# folder must stay well under the 64 MiB budget copied to the GPU machine; its size is printed at
# the end.
#
# Environment: BUILD_PYTHON (default .venv/bin/python, else python3): the venv whose pip builds
# and whose versions are pinned; it needs torch to build DeepSpeed's wheel.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${BUILD_PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
OUT=bench/wheels
TARGET_PY=3.12
PLATFORMS=(manylinux2014_x86_64 manylinux_2_17_x86_64 manylinux_2_28_x86_64 manylinux_2_31_x86_64
           manylinux_2_34_x86_64 manylinux_2_35_x86_64)
# the project's and DeepSpeed's deps the image lacks (pydantic's own three included)
PACKAGES=(pydantic pydantic-core annotated-types typing-inspection typing-extensions
          hjson ninja py-cpuinfo msgpack einops nvidia-ml-py
          penman smatch bm25s llguidance liger-kernel)
# Pins of what the build venv does not have (the CPU venv has no liger-kernel or nvidia-ml-py).
# liger-kernel: modeling.apply_liger imports its private _apply_liger_kernel_to_instance, so the
# version is the one checked (pyproject's gpu extra has the same pin).
PINS=(liger-kernel==0.8.5 nvidia-ml-py==13.615.71)
DEEPSPEED_VERSION=$("$PY" -c 'import importlib.metadata as m; print(m.version("deepspeed"))' 2>/dev/null || echo 0.19.8)

pin() {  # NAME==VERSION as installed in the build venv, else from PINS; never unpinned
    local v p
    v=$("$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$1" 2>/dev/null) \
        && { echo "$1==$v"; return; }
    for p in "${PINS[@]}"; do [ "${p%%==*}" = "$1" ] && { echo "$p"; return; }; done
    echo "build_wheels.sh: no version for $1: install it in the build venv or add it to PINS" >&2
    exit 1
}
platform_args() { local p; for p in "${PLATFORMS[@]}"; do printf -- '--platform\n%s\n' "$p"; done; }
mapfile -t PLATFORM_ARGS < <(platform_args)

rm -rf "$OUT"
mkdir -p "$OUT"
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT

echo "== DeepSpeed $DEEPSPEED_VERSION from its sdist, DS_BUILD_OPS=0"
"$PY" -m pip download -q --no-deps --no-build-isolation --no-binary=:all: -d "$TMP/sdist" "deepspeed==$DEEPSPEED_VERSION"
DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$OUT" "$TMP"/sdist/deepspeed-*.tar.gz

for name in "${PACKAGES[@]}"; do
    req=$(pin "$name")
    echo "== $req"
    if ! "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$TARGET_PY" \
            --implementation cp "${PLATFORM_ARGS[@]}" -d "$OUT" "$req" 2>"$TMP/err"; then
        echo "   no wheel for cp312 manylinux: building one from the sdist"
        "$PY" -m pip wheel -q --no-deps -w "$OUT" "$req" || { cat "$TMP/err"; exit 1; }
    fi
done

# The MANIFEST: every carried wheel as name==version (gpu_check.py check-wheels reads it).
for w in "$OUT"/*.whl; do basename "$w" | awk -F- '{print $1 "==" $2}'; done >"$OUT/MANIFEST"
echo "== MANIFEST: $(wc -l <"$OUT/MANIFEST") wheels"
"$PY" bench/gpu_check.py check-wheels "$OUT"

echo "== check: every wheel installs for CPython $TARGET_PY manylinux x86_64 (dry run, --no-index)"
names=()
for w in "$OUT"/*.whl; do names+=("$(basename "$w" | cut -d- -f1)"); done
"$PY" -m pip install -q --dry-run --ignore-installed --no-index --no-deps --find-links "$OUT" \
    --only-binary=:all: --python-version "$TARGET_PY" --implementation cp --abi cp312 --abi abi3 --abi none \
    "${PLATFORM_ARGS[@]}" --target "$TMP/target" "${names[@]}"
echo "   resolved: ${names[*]}"

echo "== check: a fresh $(python3 -V) venv installs what it can of them (--no-index) and imports it"
python3 -m venv "$TMP/venv"
chosen=$("$TMP/venv/bin/python" bench/gpu_check.py wheels "$OUT")
# shellcheck disable=SC2086
"$TMP/venv/bin/python" -m pip install -q --no-index --no-deps --find-links "$OUT" $chosen
"$TMP/venv/bin/python" -c 'import hjson, cpuinfo, einops, penman, smatch, annotated_types, typing_inspection; print("   imports ok")'

echo "== bench/wheels: $(ls "$OUT" | wc -l) wheels, $(du -sb "$OUT" | cut -f1) bytes ($(du -sh "$OUT" | cut -f1)); the budget copied to the GPU machine is 64 MiB"
ls -l "$OUT" | awk 'NR > 1 {printf "   %9d  %s\n", $5, $9}'
