#!/usr/bin/env bash
# The GPU check, on the GPUs of one machine in at most 12 minutes (each stage has its own time limit, with headroom):
#   1. the model equivalence checks of tests/test_mos.py on CUDA, fp32 and bf16 autocast (tests/test_gpu.py)
#   2. the iwslt14 preset (HAT's space and recipe) trained $STEPS steps in bf16 on the real 5% IWSLT14 sample:
#      target tokens/s and peak GPU memory (torch.cuda.max_memory_allocated)
#   3. `torchrun --nproc_per_node=N train.py` for a few steps, N = every GPU present (data parallel over NCCL
#      from 2 GPUs on; one GPU takes train.py's single-process path)
#   4. latency of the largest and smallest iwslt14 subnets on the GPU: batch 1, beam 5, HAT's 23+23 tokens,
#      CUDA-synchronised (latency.py), under both protocols, each labelled: `hat` (HAT's model-only timing, the one
#      to compare with HAT's published table) and `beam` (the real beam search, latency.py's default)
# Everything it prints goes to $OUT/gpu_check.txt (each stage also to its own file), with nvidia-smi naming the
# hardware and $OUT/summary.json holding the figures. Needs only this repository and ../shared/data.
#
#   bash tests/gpu_check.sh                        # writes experiments/results/gpu/
#   OUT=/tmp/gpu STEPS=200 bash tests/gpu_check.sh
#   IWSLT=path/to/iwslt14.de-en bash tests/gpu_check.sh   # where the shared data lies elsewhere
set -uo pipefail
cd "$(dirname "$0")/.."  # the repository root
export PYTHONUNBUFFERED=1
OUT=${OUT:-experiments/results/gpu}
STEPS=${STEPS:-300}
IWSLT=${IWSLT:-../shared/data/iwslt14.de-en}
[ -d "$IWSLT/train-sample" ] || IWSLT=shared/data/iwslt14.de-en  # a copy of the repository that carries shared/
GPUS=$(python -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)  # torchrun ranks (stage 3)
WORK=$(mktemp -d)  # prepared data and checkpoints: large, never committed
mkdir -p "$OUT"
rm -f "$OUT/latency.jsonl"  # latency.py appends to it
exec > >(tee "$OUT/gpu_check.txt") 2>&1  # from here on, everything printed is also in gpu_check.txt

STAGES="$OUT/stages.tsv"
printf "stage\texit\tseconds\n" > "$STAGES"
stage() {  # stage NAME SECONDS COMMAND...: run with a time limit, print and keep its output, record exit and time
  local name=$1 limit=$2 start rc
  shift 2
  echo "=== $name (limit ${limit} s): $*"
  start=$(date +%s)
  timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.txt"
  rc=${PIPESTATUS[0]}
  printf "%s\t%s\t%s\n" "$name" "$rc" "$(( $(date +%s) - start ))" | tee -a "$STAGES"
}

# ---- 0. the hardware and software
echo "=== $(date -u +%FT%TZ) gpu_check on $(hostname), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
nvidia-smi 2>&1 | tee "$OUT/nvidia-smi.txt"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee -a "$OUT/nvidia-smi.txt"
python - <<'EOF' 2>&1 | tee "$OUT/env.txt"
import platform, torch
print(f"python {platform.python_version()} | torch {torch.__version__} | CUDA {torch.version.cuda} | "
      f"cuda available {torch.cuda.is_available()}")
if torch.cuda.is_available():
    print(f"device {torch.cuda.get_device_name()} | bf16 {torch.cuda.is_bf16_supported()} | "
          f"{torch.cuda.get_device_properties(0).total_memory / 2**30:.1f} GiB | TF32 matmul "
          f"{torch.backends.cuda.matmul.allow_tf32}")
EOF
if ! python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "error: no CUDA device visible to torch; this check needs a GPU (the CPU suite skips tests/test_gpu.py)"
  exit 2
fi

# ---- 1. model equivalence on CUDA, fp32 and bf16 autocast
stage pytest 120 python -m pytest -q -rA -m gpu -p no:cacheprovider tests/test_gpu.py

# ---- 2. the iwslt14 preset in bf16 on the real sample: tokens/s and peak memory
# (--warmup=100 instead of the preset's 10,000 so that the loss visibly falls within $STEPS steps)
if [ -d "$IWSLT/train-sample" ]; then
  stage prepare 30 python data/prepare.py iwslt14 --source="$IWSLT" --train_dir="$IWSLT/train-sample" \
    --out="$WORK/data"
  stage train 180 python - --preset=iwslt14 --data_dir="$WORK/data" --device=cuda --bf16=True \
    --max_steps="$STEPS" --warmup=100 --eval_interval="$STEPS" --save_interval=0 --log_interval=50 \
    --bleu_sentences=100 --test_sentences=200 --avg_last=0 --out_dir="$WORK/train" <<'EOF'
import json, sys, torch, train
train.main(sys.argv[1:])  # the whole run in this process, so that its peak memory can be read afterwards
print("peak memory " + json.dumps({"max_memory_allocated_gib": torch.cuda.max_memory_allocated() / 2**30,
                                   "max_memory_reserved_gib": torch.cuda.max_memory_reserved() / 2**30}))
EOF
  cp "$WORK/train/train_log.jsonl" "$WORK/train/log.jsonl" "$OUT/" 2>/dev/null

  # ---- 3. torchrun over every GPU present (2 or more: NCCL's all-reduce of gradients and of the stop flag;
  # 1: train.py's single-process path). The limit leaves room for NCCL's start-up on each rank.
  stage torchrun 150 torchrun --standalone --nproc_per_node="$(( GPUS > 0 ? GPUS : 1 ))" train.py --preset=iwslt14 \
    --data_dir="$WORK/data" \
    --device=cuda --bf16=True --max_steps=20 --eval_interval=20 --bleu_sentences=-1 --test_sentences=20 \
    --avg_last=0 --out_dir="$WORK/torchrun"
else
  echo "=== no $IWSLT/train-sample: training stages skipped (set IWSLT=path/to/iwslt14.de-en)"
fi

# ---- 4. latency on the GPU under both protocols (random weights: the time does not depend on them; vocabularies
# of the full IWSLT14 data, fairseq's dictionaries plus 4 specials, as HAT's models have)
for protocol in hat beam; do
  for arch in largest smallest; do
    stage "latency_${protocol}_$arch" 45 python latency.py measure --space=iwslt14 --arch=$arch --device=cuda \
      --beam=5 --src_vocab=8848 --tgt_vocab=6632 --repeats=3 --protocol=$protocol --log="$OUT/latency.jsonl"
  done
done

# ---- the figures, in one file
python - "$OUT" <<'EOF'
import json, statistics, sys
from pathlib import Path
out = Path(sys.argv[1])
read = lambda name: (out / name).read_text() if (out / name).exists() else ""
summary = {"gpu": read("nvidia-smi.txt").strip().splitlines()[-1] if read("nvidia-smi.txt") else None,
           "env": read("env.txt").strip(),
           "stages": [dict(zip(("stage", "exit", "seconds"), l.split("\t"))) for l in read("stages.tsv").splitlines()[1:]],
           "pytest": (read("pytest.txt").strip().splitlines() or [""])[-1]}
log = [json.loads(l) for l in read("train_log.jsonl").splitlines()]
if log:
    rates = [r["tok_per_s"] for r in log[1:]] or [log[0]["tok_per_s"]]  # the first interval includes start-up
    summary["train"] = {"steps": log[-1]["step"], "tok_per_s_median": statistics.median(rates),
                        "loss_largest_first_last": [log[0]["L"], log[-1]["L"]]}
for line in read("train.txt").splitlines():
    if line.startswith("peak memory "):
        summary.setdefault("train", {}).update(json.loads(line[len("peak memory "):]))
summary["latency_ms"] = {f'{r["runs"][0]["protocol"]} protocol, {r["label"]}': r["median_ms"]
                         for r in map(json.loads, read("latency.jsonl").splitlines())}
(out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
print("=== summary\n" + json.dumps(summary, indent=1))
EOF
rm -rf "$WORK"
