"""
Stage 2: SAM and the 16x compressor are frozen; CLIP, the projector and the GPT go on training from the stage-1
weights, with text-only conversations mixed in so the GPT keeps its language (DeepSeek-OCR's second stage).

    python -m scripts.vis_mid_train --text_data=chats.jsonl                    # continues checkpoints/vis_tok
    python -m scripts.vis_mid_train --start_from=ocr1 --data=data/synth_train/dataset.json --model_tag=ocr1_mid
    torchrun --standalone --nproc_per_node=8 -m scripts.vis_mid_train -- --model=d20 --run=ocr_mid

It is scripts/vis_tok_train.py (same loop, same variables and flags) with the stage-2 defaults below; any
--key=value given here overrides them.
"""

import runpy
import sys

STAGE2_DEFAULTS = [
    "--model_tag=vis_mid",
    "--start_from=vis_tok",  # the stage-1 run: its weights, tokenizer and image mode
    "--freeze_sam=True",
    "--freeze_compressor=True",
    "--text_ratio=0.2",  # used when --text_data is given
]

sys.argv[1:1] = STAGE2_DEFAULTS  # the user's own arguments come after, so they win
runpy.run_module("scripts.vis_tok_train", run_name="__main__")
