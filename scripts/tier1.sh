#!/usr/bin/env bash
# The tier-1 sanity run: on a fresh machine, set up, make the data, train the tokenizer, overfit the 10-record
# tier-1 set with the tiny model, and print the eval table (10/10 exact is the pass mark).
#   bash scripts/tier1.sh                       # the committed set, data/tier1 (regenerated, deterministic)
#   bash scripts/tier1.sh --data=PATH           # any other tier-1 set in our dataset format
#   bash scripts/tier1.sh --seed=1              # other arguments go to the training script
# With --data the tokenizer is trained on the default corpus plus PATH's prompts and answers. Outputs go to
# checkpoints/ (or $NANOVLM_BASE_DIR); the summary JSON is <base dir>/tier1/eval.json.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_env.sh
base="${NANOVLM_BASE_DIR:-checkpoints}"

data=""
train_args=()
for arg in "$@"; do
    case "$arg" in
        --data=*) data="${arg#--data=}" ;;
        *) train_args+=("$arg") ;;
    esac
done

start=$(date +%s)
if [ -z "$data" ]; then
    data=data/tier1/dataset.json
    python -m scripts.make_data --tier1=True                    # deterministic: rewrites data/tier1 identically
    python -m scripts.tok_train                                 # vocab 4096, offline corpus
else
    [ -f "$data" ] || { echo "error: --data=$data: no such file"; exit 1; }
    python -m scripts.tok_train --data="default,$data"
fi
python -m scripts.vis_tok_train --model_tag=tier1 --data="$data" ${train_args[@]+"${train_args[@]}"}
python -m scripts.vision_sample --model_tag=tier1 --data="$data" --json="$base/tier1/eval.json"
echo "tier-1 run finished in $(( $(date +%s) - start ))s"
