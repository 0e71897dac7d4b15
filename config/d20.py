# nanochat's d20 (chat SFT) + DeepSeek-OCR's DeepEncoder, fine-tuned on OCR data on one 8-GPU node:
#   torchrun --standalone --nproc_per_node=8 -m scripts.vis_tok_train config/d20.py --vision_from=DIR --data=...
# Pretrained weights on both sides, so learning rates are fine-tuning rates (the tiny preset's 1e-3 / 3e-3 are for
# training from scratch and would wreck them). Any --key=value after the file overrides it.
import os

model = "d20"
init_from = os.path.expanduser("~/.cache/nanochat/chatsft_checkpoints/d20")  # nanochat's layout
nanochat_tokenizer = os.path.expanduser("~/.cache/nanochat/tokenizer")
image_mode = "base"  # 1024 px letterboxed: 256 visual tokens + newlines, DeepSeek-OCR's base mode
model_tag = "d20_ocr"
# 32 examples per step: 4 per GPU on 8 GPUs, or accumulated on fewer
total_batch_size = 32
device_batch_size = 4
num_iterations = 2000
sam_lr = 5e-5
compressor_lr = 5e-5
clip_lr = 5e-5
projector_lr = 5e-5
gpt_matrices_lr = 3e-5
embeddings_lr = 3e-5
lm_head_lr = 3e-5
warmup_ratio = 0.05
eval_every = 250
eval_samples = 8
save_every = 500
