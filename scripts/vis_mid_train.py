"""
Stage 2: SAM and the 16x compressor are frozen; CLIP, the projector and the GPT go on training from the stage-1
weights, with text-only conversations mixed in so the GPT keeps its language (DeepSeek-OCR's second stage).

    python -m scripts.vis_mid_train --text_data=chats.jsonl                    # continues checkpoints/vis_tok
    python -m scripts.vis_mid_train --start_from=ocr1 --data=data/synth_train/dataset.json --model_tag=ocr1_mid
    torchrun --standalone --nproc_per_node=8 -m scripts.vis_mid_train config/d20.py --start_from=d20_ocr

Every variable of stage 1 (scripts/vis_tok_train.py) is a variable here too, with the same meaning; stage 2
changes the ones below. Override any of them with --key=value.
"""

from scripts.vis_tok_train import *  # noqa: F401,F403  (stage 1's variables, configure and main)

model_tag = "vis_mid"
start_from = "vis_tok"  # the stage-1 run: its weights, tokenizer and image mode
freeze_sam = True
freeze_compressor = True
text_data = ""  # JSONL of text-only conversations (required while text_ratio > 0)
text_ratio = 0.2  # fraction of the samples that are text-only

if __name__ == "__main__":
    main(configure(globals()))  # noqa: F405
