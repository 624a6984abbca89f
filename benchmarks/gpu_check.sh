#!/usr/bin/env bash
# The planner against a GPU (issue 23): real SDXL shapes at 1024 px (then FLUX.1-dev over an NF4 base), one LoRA Diffusion-DPO step with random
# weights built from the published configs (no hub), torch.cuda.max_memory_allocated against the plan, and
# the step time as model FLOPs utilisation. Writes benchmarks/results/gpu_check.json.
#   bash benchmarks/gpu_check.sh              # on the GPU machine, from the repository root
#   bash benchmarks/gpu_check.sh --dry-run    # anywhere: the same script on a narrow config, on CPU
# Extra arguments go to benchmarks/gpu_check.py (e.g. --no-checkpointing, --batch-size 2, --peak-tflops 989).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if [ "${1:-}" = "--dry-run" ]; then
    shift
    OMP_NUM_THREADS=1 "$PY" benchmarks/gpu_check.py --tiny --device cpu --steps 1 \
        --out benchmarks/results/gpu_check_dry_run.json "$@"
    OMP_NUM_THREADS=1 exec "$PY" benchmarks/gpu_check.py --tiny --device cpu --steps 1 --model flux-dev \
        --quantize nf4 --out benchmarks/results/gpu_check_flux_nf4_dry_run.json "$@"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
# a planning pass uses one CPU thread per process; the GPU step is what is timed
"$PY" benchmarks/gpu_check.py --device cuda "$@"
# FLUX.1-dev (11.9 B) over an NF4 base at 1024 px: the 24 GiB recipe (issue 23)
"$PY" benchmarks/gpu_check.py --device cuda --model flux-dev --quantize nf4 \
    --out benchmarks/results/gpu_check_flux_nf4.json "$@"
