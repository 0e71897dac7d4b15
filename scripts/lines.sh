#!/usr/bin/env bash
# Held-out reading: train the tiny "lines" model on text lines drawn on the fly (never the same image twice) and
# measure it on 200 lines it never saw. On a fresh machine: set up, make the held-out set, train a byte-level
# tokenizer, train (one uninterrupted run), evaluate, and draw the sheet of 24 held-out predictions.
# Outputs go to checkpoints/ (or $NANOVLM_BASE_DIR): model_tag lines, lines/eval.json, lines/sheet.png.
# Extra arguments go to the training script.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_env.sh
base="${NANOVLM_BASE_DIR:-checkpoints}"

start=$(date +%s)
python -m scripts.make_data --n=200 --split=val --seed=777 --kinds=line2 --out_dir=data/synth_lines_val
python -m scripts.tok_train --vocab_size=271 --out_dir="$base/tokenizer_bytes"   # 256 bytes + specials: no merges
python -m scripts.vis_tok_train --model=lines --model_tag=lines --tokenizer_dir="$base/tokenizer_bytes" \
    --data=synth:line2:1000000:1 --val_data=data/synth_lines_val/dataset.json \
    --num_iterations=7000 --device_batch_size=16 --total_batch_size=16 \
    --sam_lr=2e-3 --compressor_lr=2e-3 --clip_lr=2e-3 --projector_lr=2e-3 \
    --eval_every=1000 --eval_samples=32 --max_new_tokens=32 --loader_workers=1 "$@"
python -m scripts.vision_sample --model_tag=lines --data=data/synth_lines_val/dataset.json --max_new_tokens=32 \
    --json="$base/lines/eval.json" --sheet="$base/lines/sheet.png"
echo "lines run finished in $(( $(date +%s) - start ))s"
