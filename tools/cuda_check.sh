#!/usr/bin/env bash
# duet-vlm on a CUDA machine: `duet-vlm check` on the shipped demo model (three dtypes, three methods,
# SDPA; eager and FlashAttention-2 in bfloat16) and the CUDA suite (`pytest -m cuda`: every family's
# tiny model, tests/test_cuda.py). Writes every report and the logs to OUT (default cuda-check/) and
# packs them into OUT/results.tar.gz. Run from the repository root with duet-vlm importable. Narrow it
# with DTYPES, METHODS (the demo model's checks), ATTNS (its other backends) and WORKERS (pytest-xdist
# processes), e.g. DTYPES="bfloat16 float32" METHODS="duet fastv" ATTNS=eager WORKERS=14 (the H200 run
# in docs/check.md).
set -u
OUT=${1:-cuda-check}
mkdir -p "$OUT/reports"
export PYTHONUNBUFFERED=1
{
  python3 -c "import platform, torch, transformers; print(platform.platform(), 'python', platform.python_version(), 'torch', torch.__version__, 'CUDA', torch.version.cuda, torch.cuda.get_device_name(0), 'transformers', transformers.__version__)"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
} 2>&1 | tee "$OUT/machine.txt"
{
for dtype in ${DTYPES:-bfloat16 float16 float32}; do
  for method in ${METHODS:-duet fastv visionzip}; do
    echo "== duet-vlm check --model demo --device cuda --dtype $dtype --attn sdpa --method $method"
    python3 -m duet_vlm.cli check --model demo --device cuda --dtype "$dtype" --attn sdpa --method "$method" \
      --rounds 5 --json "$OUT/reports/demo_${method}_${dtype}_sdpa.json"
    echo "rc $?"
  done
done
for attn in ${ATTNS:-eager flash_attention_2}; do
  echo "== duet-vlm check --model demo --device cuda --dtype bfloat16 --attn $attn --method duet"
  python3 -m duet_vlm.cli check --model demo --device cuda --dtype bfloat16 --attn "$attn" --method duet \
    --rounds 5 --json "$OUT/reports/demo_duet_bfloat16_${attn}.json"
  echo "rc $?"
done
} 2>&1 | tee "$OUT/demo.log"
python3 -m pytest -p no:cacheprovider -m cuda tests/test_cuda.py -n "${WORKERS:-8}" -rfEs \
  --junitxml="$OUT/reports/cuda.xml" 2>&1 | tee "$OUT/pytest.log"
tar -czf "$OUT/results.tar.gz" -C "$OUT" reports machine.txt
