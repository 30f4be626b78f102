#!/usr/bin/env bash
# Every speed bench on CUDA in one call, for the first GPU this project meets: the DM-GAN step at
# the bird cfg (fp32 and bf16 + channels_last, with its FLOP rate against a matmul's), the RN50
# CLIP step against open_clip, the DiscreteVAE and DALLE steps and DALLE sampling against
# dalle-pytorch (text2img's sizes, fp32 and --amp), at the original sizes with warm-up steps.
#   bench/gpu.sh [OUT=output/bench_gpu]          # each bench's table in OUT/<bench>.txt, then all of them
# Peers missing from the environment (bench/requirements.txt) skip their bench with a line saying so.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
out=${1:-output/bench_gpu}
mkdir -p "$out"
if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  echo "bench/gpu.sh: no CUDA device here (torch.cuda.is_available() is False); nothing measured" >&2
  exit 2
fi
"$PY" -c 'import torch; p = torch.cuda.get_device_properties(0); print(f"device: {p.name}, {p.total_memory / 2**30:.0f} GiB, torch {torch.__version__}")' | tee "$out/device.txt"

run() {   # name, then the command; its output in $out/<name>.txt, a failure noted and the rest run on
  local name=$1; shift
  echo "== $name: $*"
  if timeout 150 "$@" > "$out/$name.txt" 2>&1; then tail -n 25 "$out/$name.txt"; else echo "$name: failed or skipped (see $out/$name.txt)"; fi
}
run dmgan "$PY" bench/dmgan.py --device cuda --steps 10 --warmup 3 --out "$out/dmgan.json"
run clip "$PY" bench/clip.py --device cuda --batch 64 --steps 5 --rounds 3 --out "$out/clip.json"
run dalle_fp32 "$PY" bench/dalle.py --device cuda --batch 16 --steps 3 --json "$out/dalle_fp32.json"
run dalle_amp "$PY" bench/dalle.py --device cuda --batch 16 --steps 3 --amp --json "$out/dalle_amp.json"
echo "tables: $out/*.txt"
