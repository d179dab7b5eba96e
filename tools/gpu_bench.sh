#!/usr/bin/env bash
# The speed table at 7B shapes (`duet-vlm bench --gpu`, duet_vlm/bench/gpu.py) on the lent GPU machine,
# whose image has torch 2.11, transformers 5.17 (below this project's floor) and no package index: the
# wheels it lacks travel with the call, in .whl/ (docs/check.md, "The speed table on a GPU").
#
#   bash tools/gpu_bench.sh fetch            here: the wheels into .whl/ (ignored by git), tests/data/vectors
#                                            moved aside (tools/device_carry.py), and the size check
#   bash tools/gpu_bench.sh run [ARGS ...]   there: the wheels under /tmp/site, then the bench (ARGS go to it);
#                                            the record is $OUT/gpu_7b.json ($OUT: the device tool's folder)
#   bash tools/gpu_bench.sh restore          here, after the call: tests/data/vectors back in the tree
set -euo pipefail
cd "$(dirname "$0")/.."
# transformers 5.24.0 (pure Python) and what it needs beyond the image's packages: regex >= 2025.10.22
# (the image's version is not listed); huggingface-hub 1.33, tokenizers 0.23.2, safetensors 0.8, typer,
# rich, peft and accelerate are there (the device tool's KINDS.md).
wheels=("transformers==5.24.0" "regex==2026.5.9")
case "${1:-}" in
fetch)
    grep -qxF '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
    rm -rf .whl && mkdir -p .whl
    PIP_CONFIG_FILE=/dev/null python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d .whl "${wheels[@]}"
    python3 tools/device_carry.py --aside .whl
    ;;
restore)
    python3 tools/device_carry.py --restore
    ;;
run)
    shift
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site:$PWD/src" PYTHONUNBUFFERED=1
    python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name(0))"
    python3 -m duet_vlm.cli bench --gpu --output "${OUT:-.}/gpu_7b.json" "$@"
    ;;
*)
    echo "usage: bash tools/gpu_bench.sh fetch | run [ARGS ...] | restore" >&2
    exit 2
    ;;
esac
