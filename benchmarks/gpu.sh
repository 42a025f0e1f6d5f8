#!/usr/bin/env bash
# The H200 check of issue 8, as one script (about 10 minutes with the transfer):
#   bash benchmarks/gpu.sh [PHOTO_DIR]
# It runs experiments.benchmark for resnet50 and vgg16 at 224 px, bf16-mixed, channels_last, on the
# decode-once cache over a subset of real photos (pass a folder of under 50 MB, e.g. 3,000 of the shared
# 96-px photos copied into the repository's ignored data/ folder), and prints img/s, the ratios, and the
# achieved TFLOP/s as a fraction of the chip's measured bf16 matmul rate. Record the output in
# benchmarks/RESULTS.md with the date and chip.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:-data/PetImages-subset}
OUT=${OUT:-benchmarks/out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python - <<'PY' | tee "$OUT/matmul.txt"
import torch, time
a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
for _ in range(3): a @ b
torch.cuda.synchronize(); t = time.perf_counter(); n = 50
for _ in range(n): a @ b
torch.cuda.synchronize(); dt = time.perf_counter() - t
print(f"bf16 matmul: {2 * 8192**3 * n / dt / 1e12:.1f} TFLOP/s")
PY
for backbone in resnet50 vgg16; do
  python -m experiments.benchmark --backbone "$backbone" --image-size 224 --batch-size 256 --steps 30 --warmup 10 \
      --rounds 2 --data-dir "$DATA" --cache --channels-last --precision bf16-mixed --num-workers 12 \
      --out "$OUT/$backbone.json" | tee "$OUT/$backbone.txt"
done
python - "$OUT" <<'PY'
import json, re, sys
from pathlib import Path
out = Path(sys.argv[1])
peak = float(re.search(r"([\d.]+) TFLOP/s", (out / "matmul.txt").read_text()).group(1))
# forward+backward = 3 x the forward FLOPs; forward GFLOPs per 224-px image (fvcore-style counts, 2 FLOPs per MAC)
forward_gflop = {"resnet50": 8.2, "vgg16": 31.0}
for name, gflop in forward_gflop.items():
    report = json.loads((out / f"{name}.json").read_text())
    rate = report["images_per_second"]["lightning"]
    tflops = 3 * gflop * rate / 1e3
    alone = report["images_per_second"]["model_alone_channels_last"]
    print(f"{name}: {rate:.0f} img/s end to end ({rate / alone:.2f} of model alone), {tflops:.1f} TFLOP/s = "
          f"{tflops / peak:.2f} of the measured bf16 matmul rate ({peak:.0f} TFLOP/s)")
PY
