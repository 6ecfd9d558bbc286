#!/usr/bin/env bash
# The five training stages end to end on CPU with the tiny twins (configs/train/tiny/): each stage starts
# from the previous one's weights (--checkpoint), all with plain RoPE; then YaRN x4 is switched on in the
# last one's weights (docs/training.md, "Long context"). No download; generated chat data. About 10-15 minutes.
set -euo pipefail
OUT=runs/tiny
python -m mamba_moe.training.chatgen explain "$OUT/data/explain.jsonl" --n 500
python -m mamba_moe.training.chatgen reasoning "$OUT/data/reasoning.jsonl" --n 2000
python -m mamba_moe.training.chatgen recall "$OUT/data/recall.jsonl" --n 2000
mamba-moe train --config configs/train/tiny/stage1_pretrain.yaml "$@"
mamba-moe train --config configs/train/tiny/stage2_instruction.yaml --checkpoint "$OUT/stage1_pretrain" "$@"
mamba-moe train --config configs/train/tiny/stage3_reasoning.yaml --checkpoint "$OUT/stage2_instruction" "$@"
mamba-moe train --config configs/train/tiny/stage4_memory.yaml --checkpoint "$OUT/stage3_reasoning" "$@"
mamba-moe train --config configs/train/tiny/stage5_qat.yaml --checkpoint "$OUT/stage4_memory" "$@"
# Original length: the longest seq_len of the five runs (384); the model to export and evaluate is final-yarn4.
mamba-moe extend-context "$OUT/stage5_qat/final-quantized" --yarn 4 -o "$OUT/final-yarn4" --overwrite
mamba-moe extend-context "$OUT/final-yarn4" --show
