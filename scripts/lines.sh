#!/usr/bin/env bash
# Reading real text: train the tiny "lines" model on text lines drawn on the fly (never the same image twice) and
# measure it on three held-out sets that share neither lexicon nor fonts with training:
#   data/synth_read_words  200 lines of the validation lexicon (+ letters, numbers, symbols) in training fonts
#   data/synth_read_fonts  the same kind of lines in the held-out font families (nanovlm/textlines.py)
#   data/print_val         word runs cut from real typeset PDF pages of the validation manuals (nanovlm/realprint.py)
# then compare with tesseract on the same lines (scripts/bench_read.py). On a fresh machine it sets up first
# (scripts/setup_env.sh, then scripts/setup_data.sh: fonts, word list, manuals, tesseract through apt-get).
# Outputs go to checkpoints/ (or $NANOVLM_BASE_DIR): model_tag lines, lines/eval_{words,fonts,print}.json and
# sheet_*.png, lines/bench_read.json. Extra arguments go to the training script (e.g. --seed=1).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_env.sh
source scripts/setup_data.sh
base="${NANOVLM_BASE_DIR:-checkpoints}"

start=$(date +%s)
python -m scripts.make_data --n=200 --split=val --seed=777 --kinds=read --out_dir=data/synth_read_words
python -m scripts.make_data --n=200 --split=val --seed=777 --kinds=read_fonts --out_dir=data/synth_read_fonts
python -m scripts.make_data --n=200 --split=val --seed=777 --kinds=print --out_dir=data/print_val
python -m scripts.tok_train --vocab_size=271 --out_dir="$base/tokenizer_bytes"   # 256 bytes + specials: no merges
python -m scripts.vis_tok_train --model=lines --model_tag=lines --tokenizer_dir="$base/tokenizer_bytes" \
    --data=synth:read:1000000:1 --val_data=data/synth_read_words/dataset.json --max_seq_len=224 \
    --num_iterations=4500 --device_batch_size=16 --total_batch_size=16 \
    --sam_lr=2e-3 --compressor_lr=2e-3 --clip_lr=2e-3 --projector_lr=2e-3 \
    --eval_every=1500 --eval_samples=32 --loader_workers=1 "$@"
for set in words:data/synth_read_words fonts:data/synth_read_fonts print:data/print_val; do
    python -m scripts.vision_sample --model_tag=lines --data="${set#*:}/dataset.json" \
        --json="$base/lines/eval_${set%%:*}.json" --sheet="$base/lines/sheet_${set%%:*}.png" | tail -n 4
done
python -m scripts.bench_read --model_tag=lines --batch_size=32 --json="$base/lines/bench_read.json" \
    --data=data/synth_read_words/dataset.json,data/synth_read_fonts/dataset.json,data/print_val/dataset.json
echo "lines run finished in $(( $(date +%s) - start ))s"
