#!/usr/bin/env bash
# The tier-1 sanity run: on a fresh machine, set up, make the data, train the tokenizer, overfit the 10-record
# tier-1 set with the tiny model, and print the eval table. Expect 10/10 exact in a few minutes on 2 CPU cores.
# Outputs go to checkpoints/ (or $NANOVLM_BASE_DIR). Extra arguments go to the training script.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_env.sh

start=$(date +%s)
python -m scripts.make_data --tier1=True                        # deterministic: rewrites data/tier1 identically
python -m scripts.tok_train                                     # vocab 4096, offline corpus
python -m scripts.vis_tok_train --model_tag=tier1 "$@"          # tiny VLM, 300 steps, everything trainable
python -m scripts.vision_sample --model_tag=tier1 --data=data/tier1/dataset.json \
    --json="${NANOVLM_BASE_DIR:-checkpoints}/tier1/eval.json"
echo "tier-1 run finished in $(( $(date +%s) - start ))s"
