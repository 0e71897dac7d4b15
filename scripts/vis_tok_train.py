"""
Stage 1: teach a GPT to read. Everything trains: SAM, the compressor, CLIP, the projector and the GPT.

    python -m scripts.vis_tok_train                                     # tiny model, tier-1 data, CPU
    python -m scripts.vis_tok_train --data=data/synth_train/dataset.json --val_data=data/synth_val/dataset.json
    torchrun --standalone --nproc_per_node=2 -m scripts.vis_tok_train          # the same run on 2 processes
    torchrun --standalone --nproc_per_node=8 -m scripts.vis_tok_train config/d20.py --vision_from=DIR --run=ocr

Hyperparameters are the variables below; override any of them with --key=value or a config file (see
configurator.py). total_batch_size counts examples (records) per optimizer step.
"""

from configurator import configure
from nanovlm.training import RunError, train

# run
run = "dummy"  # wandb run name; "dummy" logs nothing
model_tag = "vis_tok"  # checkpoints go to checkpoints/<model_tag>
device_type = ""  # cuda|mps|cpu, empty = autodetect
seed = 0
resume = False  # continue from the last checkpoint in checkpoints/<model_tag>
# model
model = "tiny"  # preset: tiny (CPU), lines (tiny made to read text lines) or d20 (nanochat d20 + DeepEncoder)
image_mode = ""  # empty = the preset's (tiny: resize:256, lines: line:2048:64:1, d20: base)
max_seq_len = 0  # longest training sample in tokens; 0 = the longest record of the data (nothing is truncated)
ctc_weight = 1.0  # weight of the auxiliary CTC loss, for presets with a CTC read-out (lines)
teacher_weight = 1.0  # weight of a conversation's example turns against its last answer (1 = every token alike)
token_ctc_split = 0  # > 0 (a fresh lines model): also a CTC read-out of the projected tokens, this many steps each
start_from = ""  # a nanovlm checkpoint dir (or model_tag) to start from: weights only, new optimizer
init_from = ""  # a nanochat checkpoint dir for the GPT (then resize_vocab for our special tokens)
nanochat_tokenizer = ""  # with init_from: the nanochat tokenizer dir
vision_from = ""  # a DeepSeek-OCR safetensors file/dir for the encoder
sam_from = ""  # a Hugging Face SAM (SamModel / SamVisionEncoder) safetensors file for the SAM tower
clip_from = ""  # a Hugging Face CLIPVisionModel safetensors file for the CLIP tower
tokenizer_dir = ""  # empty = checkpoints/tokenizer
grad_checkpointing = False
freeze_sam = False
freeze_compressor = False
# detection head (nanovlm/detection.py, DETR's): object queries read each image's tokens and the GPT's states of its
# prompt; trained on the boxes of grounding answers (<|det|>[[x1, y1, x2, y2]]<|/det|>), an answer without boxes
# gives only empty queries. The loss is lm + ctc_weight * ctc + det_weight * (L1, GIoU and objectness, weighted)
det_head = False
det_queries = 100  # object queries: the most boxes one image can get (DETR's 100; a page window has up to 12 lines)
det_layers = 3  # decoder layers (DETR: 6)
det_heads = 8
det_dim = 256
det_l1_weight, det_giou_weight, det_obj_weight = 5.0, 2.0, 2.0  # DETR's L1 and GIoU, Deformable DETR's focal 2
det_weight = 1.0
# fine-tuning with a frozen (optionally 4-bit) base: only LoRA adapters train, checkpoints hold only them
quant = ""  # "nf4" holds the quant_targets Linears in 4 bits (QLoRA)
double_quant = False  # also quantize the 4-bit blocks' scales (0.5 -> 0.127 bits per parameter)
quant_targets = r"transformer\.h\.\d+\.(attn|mlp)\.c_\w+"  # regex over module names; lm_head stays full precision
lora_r = 0  # adapter rank; 0 = no adapters (full training)
lora_alpha = 32.0
lora_dropout = 0.05
lora_targets = r"transformer\.h\.\d+\.(attn|mlp)\.c_\w+"  # the GPT's Linears; add e.g. |qkv|fc1|fc2 for the towers
# data
data = "data/tier1/dataset.json"  # a dataset JSON, or synth:KIND[,KIND]:N[:SEED] drawn on the fly
val_data = ""  # empty = evaluate on the training data
text_data = ""  # JSONL of text-only conversations to mix in
text_ratio = 0.0  # fraction of samples drawn from text_data
strict = False  # stop at the first bad record instead of skipping it
loader_workers = 4  # threads that load (or draw) and preprocess images ahead of the step
# pack: several whole samples per row (up to the sequence length), each attending to itself only. It pays on tier-1
# (bench_pack: padding 61% -> 11%, 1.59x real tokens/s); a lines sample (128 image tokens) never shares a row
pack = True
# optimization
num_iterations = 400
total_batch_size = 10
device_batch_size = 0  # examples per rank per micro-batch; 0 = total_batch_size / ranks (no accumulation)
sam_lr, sam_wd = 1e-3, 0.0
compressor_lr, compressor_wd = 1e-3, 0.0
clip_lr, clip_wd = 1e-3, 0.0
projector_lr, projector_wd = 1e-3, 0.0
gpt_matrices_lr, gpt_matrices_wd = 3e-3, 0.0
embeddings_lr, embeddings_wd = 3e-3, 0.0
lm_head_lr, lm_head_wd = 3e-3, 0.0
lora_lr, lora_wd = 1e-3, 0.0
det_head_lr, det_head_wd = 1e-3, 1e-4  # the detection head's own group (weight decay: DETR's)
beta1, beta2 = 0.9, 0.95
grad_clip = 1.0
warmup_ratio = 0.05
warmdown_ratio = 0.3
final_lr_frac = 0.0
max_bad_steps = 5  # stop after this many non-finite losses in a row
# evaluation and checkpoints
eval_every = 100
eval_records = 64  # records for the validation loss
eval_samples = 4  # records answered greedily and scored at each eval
max_new_tokens = -1  # -1 = the longest reference of the samples plus a little, at least the sequence length
save_every = -1  # -1 = only at the end



def main(config):
    """Train; a run that cannot start or go on stops with its message, not a traceback."""
    try:
        return train(config)
    except (RunError, ValueError, FileNotFoundError, ImportError) as e:
        raise SystemExit(f"error: {e}")


if __name__ == "__main__":  # vis_mid_train imports these variables as its own defaults
    main(configure(globals()))
