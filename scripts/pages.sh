#!/usr/bin/env bash
# Page OCR: train the tiny "pages" model on document windows drawn on the fly (synth kind `page`: every text line
# grounded, <|ref|>text<|/ref|><|det|>[[x1, y1, x2, y2]]<|/det|>, reading order) with its detection head, then read
# two held-out page sets line by line both ways (nanovlm/pageocr.py) and compare with tesseract on the same pages:
#   data/pages_val        drawn pages in the validation lexicon and the held-out font families
#   data/pages_print_val  windows of real typeset PDF pages of the validation manuals (nanovlm/realprint.py)
# The head path reads its line crops with the line reader of scripts/lines.sh (checkpoints/lines): run that first.
# On a fresh machine it sets up first (scripts/setup_env.sh, scripts/setup_data.sh).
# Model: the tiny preset at resize:512. The windows are 640-1024 px wide with 12-50 px text; at the preset's 256 the
# smallest text shrinks to 3 px, under a SAM patch, while 512 keeps it at 6 px and gives 73 tokens (an 8 x 8 grid
# and its row ends) for the head to place up to 12 lines on. resize, not pad: a box is a fraction of the image,
# and resize keeps those fractions on the token grid. 16 object queries (a window has at most 12 lines; DETR's 100
# are for scenes) in a 2-layer, 128-wide head to match the tiny GPT. 1800 tokens hold the longest answer (1,600
# bytes with the byte tokenizer) with its image and prompt.
# Outputs go to checkpoints/ (or $NANOVLM_BASE_DIR): model_tag pages, pages/eval_{synth,print}_{grounding,head}.json,
# pages/bench_{synth,print}.json; the better path is written into the checkpoint's meta (--page_mode=auto).
# PAGES_N pages per held-out set (default 50). Extra arguments go to the training script (e.g. --num_iterations=4).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_env.sh
source scripts/setup_data.sh
base="${NANOVLM_BASE_DIR:-checkpoints}"
n="${PAGES_N:-50}"

start=$(date +%s)
python -m scripts.make_data --n="$n" --split=val --seed=777 --kinds=page --out_dir=data/pages_val
python -m scripts.make_data --n="$n" --split=val --seed=777 --kinds=page_print --out_dir=data/pages_print_val
python -m scripts.tok_train --vocab_size=271 --out_dir="$base/tokenizer_bytes"   # 256 bytes + specials: no merges
python -m scripts.vis_tok_train --model=tiny --image_mode=resize:512 --model_tag=pages \
    --tokenizer_dir="$base/tokenizer_bytes" --data=synth:page:1000000:1 --val_data=data/pages_val/dataset.json \
    --max_seq_len=1800 --det_head=True --det_queries=16 --det_layers=2 --det_heads=4 --det_dim=128 \
    --num_iterations=1500 --device_batch_size=4 --total_batch_size=4 \
    --sam_lr=2e-3 --compressor_lr=2e-3 --clip_lr=2e-3 --projector_lr=2e-3 \
    --eval_every=500 --eval_records=16 --eval_samples=2 --loader_workers=1 "$@"
train_end=$(date +%s)
echo "pages training took $(( train_end - start ))s"
for set in synth:data/pages_val print:data/pages_print_val; do
    name="${set%%:*}" data="${set#*:}/dataset.json"
    for mode in grounding head; do
        python -m scripts.vision_sample --model_tag=pages --data="$data" --page_mode=$mode --reader_tag=lines \
            --json="$base/pages/eval_${name}_${mode}.json" | tail -n 1
    done
    # the drawn pages decide which path --page_mode=auto takes: the real ones are only measured
    record=""; [ "$name" = synth ] && record="--model_tag=pages"
    python -m scripts.bench_pages --data="$data" $record --json="$base/pages/bench_${name}.json" \
        --ours="$base/pages/eval_${name}_grounding.json,$base/pages/eval_${name}_head.json"
done
echo "pages run finished in $(( $(date +%s) - start ))s"
