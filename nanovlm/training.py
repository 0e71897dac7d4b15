"""
The training loop shared by scripts/vis_tok_train.py (stage 1: everything trains) and scripts/vis_mid_train.py
(stage 2: SAM and the compressor frozen, text mixed in). The scripts hold the hyperparameters as plain
variables and call train(config); everything they share lives here once.

train() reads top to bottom: setup() builds (or restores) the run, then each step is train_step() and log_step(),
and every eval_every / save_every steps evaluate() and save(). One step: grad_accum micro-batches (inputs,
targets, images) -> VLM loss -> backward, clip, AdamW with one param group per component, LR schedule (warmup,
constant, warmdown). An eval: validation loss, the image gap (does the model use the image?), the encoder's
feature spread, and a few greedy samples scored with the shared metrics.
"""

import contextlib
import os
import time
from collections import namedtuple
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from nanovlm.checkpoint import (find_last_step, image_mode_of, load_checkpoint, load_vlm, relative_base_dir,
                                save_checkpoint)
from nanovlm.common import autocast_context, compute_cleanup, compute_init, get_base_dir, get_wandb, print0
from nanovlm.dataloader import (eval_batches, load_conversations, load_records, longest_record, prompt_counts,
                                vision_batches)
from nanovlm.detection import DetHead, DetHeadConfig, targets_from_answer
from nanovlm.evaluate import (FEATURE_SPREAD_WARN, IMAGE_GAP_WARN, evaluate_records, image_runs, span_sums,
                              summarize, validation_sums)
from nanovlm.image_process import resolve_mode
from nanovlm.importers import load_deepseek_ocr_into, load_hf_clip, load_hf_sam, load_nanochat
from nanovlm.lora import ADAPTER_KEYS, prepare_adapters
from nanovlm.report import new_history, record_eval, record_step, resume_history, write_report
from nanovlm.tokenizer import get_tokenizer, load_nanochat_tokenizer
from nanovlm.vlm import COMPONENTS, build_vlm, component_of, freeze, image_contexts, model_meta, preset_configs, \
    weight_elements_by_stage


DET_LOSSES = ("det_l1", "det_giou", "det_obj", "det_total")  # detection.detection_losses, as the log names them


class RunError(Exception):
    """A run that cannot start or cannot go on, with a message for the user (the scripts print it, no traceback)."""


# -----------------------------------------------------------------------------
# Optimizer groups and the schedule

def group_parameters(model, lrs, weight_decays):
    """
    AdamW param groups, one per component (vlm.COMPONENTS) that has trainable parameters. Stops with a list of
    offenders if a trainable parameter matches no component or several (a new module must be given a home).
    """
    members = {name: [] for name, _ in COMPONENTS}
    problems = []
    for pname, p in model.named_parameters():
        if p.requires_grad:
            try:
                members[component_of(pname)].append(p)
            except ValueError as e:
                problems.append(str(e))
    if problems:
        raise RunError("parameter groups do not cover the model exactly once:\n  " + "\n  ".join(problems))
    return [{"name": g, "params": ps, "lr": lrs[g], "initial_lr": lrs[g], "weight_decay": weight_decays[g]}
            for g, ps in members.items() if ps]


def lr_multiplier(step, num_iterations, warmup_ratio, warmdown_ratio, final_lr_frac):
    """Linear warmup, flat, linear warmdown to final_lr_frac."""
    warmup = round(warmup_ratio * num_iterations)
    warmdown = round(warmdown_ratio * num_iterations)
    if step < warmup:
        return (step + 1) / warmup
    if step <= num_iterations - warmdown:
        return 1.0
    progress = (num_iterations - step) / warmdown
    return progress * 1.0 + (1 - progress) * final_lr_frac


def batch_plan(total_batch_size, device_batch_size, world_size):
    """
    (device_batch_size, grad_accum) for total_batch_size examples per step over world_size ranks.
    device_batch_size 0 splits the total evenly across the ranks (no accumulation), so the same flags run on one
    process or under torchrun. A split that does not come out even is an error that says what would.
    """
    if device_batch_size <= 0:
        if total_batch_size % world_size:
            raise RunError(f"--total_batch_size={total_batch_size} does not split over {world_size} ranks: make it "
                             f"a multiple of {world_size}, or set --device_batch_size")
        return total_batch_size // world_size, 1
    per_step = device_batch_size * world_size
    if total_batch_size % per_step:
        raise RunError(f"--total_batch_size={total_batch_size} is not a multiple of --device_batch_size="
                         f"{device_batch_size} x {world_size} ranks = {per_step}: change one of them, or leave "
                         f"--device_batch_size=0 to split the total over the ranks")
    return device_batch_size, total_batch_size // per_step


# -----------------------------------------------------------------------------
# The model: fresh, from other weights, or this run's last checkpoint

Built = namedtuple("Built", "model tokenizer image_mode base")  # base: (checkpoint dir, step) of our own weights
ModelSetup = namedtuple("ModelSetup", "model tokenizer image_mode resume_step adapter")


def nanochat_tokenizer_dir(cfg):
    """--nanochat_tokenizer, or nanochat's own layout: <base>/tokenizer beside <base>/<kind>_checkpoints/<tag>."""
    if cfg["nanochat_tokenizer"]:
        return cfg["nanochat_tokenizer"]
    guess = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(cfg["init_from"]))), "tokenizer")
    if not os.path.isdir(guess):
        raise RunError(f"--init_from={cfg['init_from']} needs nanochat's tokenizer: pass --nanochat_tokenizer=DIR "
                         f"(not found where nanochat keeps it: {guess})")
    print0(f"nanochat tokenizer: {guess}")
    return guess


def build_model(cfg, device):
    """A fresh run's model: a preset, optionally initialised from other weights (Built)."""
    if cfg["start_from"]:
        # a previous nanovlm run (e.g. stage 1 for stage 2): its weights, tokenizer and image mode
        path = cfg["start_from"] if os.path.isdir(cfg["start_from"]) else os.path.join(get_base_dir(), cfg["start_from"])
        model, tokenizer, meta = load_vlm(path, device=device)
        print0(f"starting from {path} step {meta['step']}")
        if "adapter" in meta:
            raise RunError(f"--start_from={path} is an adapter run: give its base run instead "
                             f"({meta['adapter']['base_dir']}), or train that one further with --resume")
        return Built(model, tokenizer, image_mode_of(meta, cfg["image_mode"]), (path, meta["step"]))
    gpt = None
    if cfg["init_from"]:
        gpt, _ = load_nanochat(cfg["init_from"], device=device)
        tokenizer = load_nanochat_tokenizer(nanochat_tokenizer_dir(cfg))
        gpt.resize_vocab(tokenizer.get_vocab_size())
    else:
        tokenizer = get_tokenizer(cfg["tokenizer_dir"] or None)
    gpt_config, encoder_config, image_mode = preset_configs(cfg["model"], tokenizer.get_vocab_size(), cfg["image_mode"])
    if cfg.get("token_ctc_split", 0) > 0:
        if not encoder_config.ctc_rows:
            raise RunError(f"--token_ctc_split needs a preset with a CTC read-out (lines), not {cfg['model']}")
        encoder_config.token_ctc_split = cfg["token_ctc_split"]  # the tokens the GPT sees, read out like SAM's neck
    if gpt is not None:
        gpt_config = gpt.config
        encoder_config.out_dim = gpt_config.n_embd
    model = build_vlm(gpt_config, encoder_config, tokenizer.encode_special("<|image|>"), device=device)
    if gpt is not None:
        model.gpt.load_state_dict(gpt.state_dict())
    if cfg["vision_from"]:
        # the projector maps to DeepSeek-OCR's LM width (1280); for another n_embd only the towers carry over
        load_deepseek_ocr_into(cfg["vision_from"], model.encoder, towers_only=encoder_config.out_dim != 1280)
    if cfg["sam_from"]:
        load_hf_sam(cfg["sam_from"], model.encoder)
    if cfg["clip_from"]:
        load_hf_clip(cfg["clip_from"], model.encoder)
    return Built(model, tokenizer, image_mode, None)


def setup_model(cfg, checkpoint_dir, device, master):
    """
    The model ready to train (ModelSetup): fresh, or this run's last checkpoint when cfg["resume"]. For an
    adapter run (LoRA / QLoRA) the full-precision base is saved once (unless it is already a checkpoint) and
    adapter = {"config", "base_dir", "base_step"} goes into every meta.
    """
    if cfg["resume"]:
        step = find_last_step(checkpoint_dir)
        print0(f"resuming {checkpoint_dir} from step {step}")
        model, tokenizer, meta = load_vlm(checkpoint_dir, step, device=device, training=True)
        image_mode = image_mode_of(meta)
        if cfg["image_mode"] and resolve_mode(cfg["image_mode"]) != image_mode:
            raise RunError(f"--image_mode={cfg['image_mode']}, but {checkpoint_dir} trained in "
                             f"{image_mode}: resume in that mode, or --start_from it as a new run")
        return ModelSetup(model, tokenizer, image_mode, step, meta.get("adapter"))

    model, tokenizer, image_mode, base = build_model(cfg, device)
    adapter_config = {k: cfg[k] for k in ADAPTER_KEYS}
    if not (cfg["quant"] or cfg["lora_r"] > 0):
        return ModelSetup(model, tokenizer, image_mode, None, None)
    if base is None and not (cfg["vision_from"] or cfg["sam_from"] or cfg["clip_from"]):
        print0("warning: adapters over an encoder that starts from random weights; everything the adapters do not "
               "cover stays frozen at random (train the full model first, then --start_from it)")
    if base is None:
        # adapters are saved alone, so their base must be on disk: keep this run's starting weights once
        base = (os.path.join(checkpoint_dir, "base"), 0)
        if master:
            save_checkpoint(base[0], 0, model.state_dict(), dict(model_meta(model), image_mode=str(image_mode)))
            tokenizer.save(os.path.join(base[0], "tokenizer"))
    prepare_adapters(model, adapter_config, training=True)
    adapter = {"config": adapter_config, "base_dir": relative_base_dir(checkpoint_dir, base[0]), "base_step": base[1]}
    return ModelSetup(model, tokenizer, image_mode, None, adapter)


def setup_det_head(model, cfg, resumed):
    """
    The detection head as --det_head says: a fresh one (the det_* shape variables) on a model without one, the
    model's own (its weights and shape) on a --start_from model with one, none when --det_head=False (a head of
    the starting model is left out, said in one line); a resumed run must keep what it had. The loss weights
    (also the matching cost's) are always the flags'.
    """
    wanted, has = cfg.get("det_head", False), model.det_head is not None
    if resumed and wanted != has:
        raise RunError(f"--det_head={wanted}, but the run to resume {'has' if has else 'has no'} detection head")
    if not wanted:
        if has:
            print0("the starting model's detection head is left out (--det_head=False)")
            model.det_head = None
        return
    if cfg["quant"] or cfg["lora_r"] > 0:
        raise RunError("--det_head trains a full head, but an adapter run (--quant, --lora_r) saves its adapters alone")
    if not has:
        width = model.gpt.config.n_embd
        model.det_head = DetHead(DetHeadConfig(n_queries=cfg["det_queries"], n_layers=cfg["det_layers"],
                                               n_heads=cfg["det_heads"], dim=cfg["det_dim"], vision_dim=width,
                                               text_dim=width)).to(model.get_device())
    model.det_head.config.l1_weight = cfg["det_l1_weight"]
    model.det_head.config.giou_weight = cfg["det_giou_weight"]
    model.det_head.config.obj_weight = cfg["det_obj_weight"]


# -----------------------------------------------------------------------------
# Pieces of a step and an eval

def sequence_length(model, tokenizer, records, texts, image_mode, max_seq_len):
    """
    The longest sample the run trains on (tokens, not counting the shifted target): max_seq_len, or by default
    the longest record of the training data. A record longer than max_seq_len stops the run here, before any
    step, with its name; so does one longer than the model's rotary table.
    """
    longest, name = longest_record(records, tokenizer, image_mode)
    for i, conversation in enumerate(texts or []):
        n = len(tokenizer.render_conversation(conversation)[0]) - 1
        if n > longest:
            longest, name = n, f"text conversation {i + 1}"
    length = max_seq_len or longest
    if longest > length:
        raise RunError(f"record {name} is {longest} tokens, longer than --max_seq_len={max_seq_len}: raise it "
                         f"(or leave it 0, the longest record) or drop the record")
    capacity = model.gpt.cos.size(1)
    if length > capacity:
        raise RunError(f"sequence length {length} (record {name}) exceeds this model's rotary table of {capacity}")
    model.config.sequence_len = max(length, 1)  # what the checkpoint's meta and the eval budgets see
    print0(f"sequence length {length} tokens (longest training record: {name}, {longest} tokens)")
    return length


def ctc_targets_of(inputs, targets, tokenizer, image_token_id):
    """The text each image of the batch shows, as byte tensors for the CTC read-out, in the batch's image order:
    the answer of the turn that shows it (its supervised tokens without the special ones). A turn starts at a
    <|bos|> or <|user_start|>, so a packed row holding several samples, and a K-shot sample holding several turns,
    give each image its own text (one per <|image|> run: a turn showing two images gives both its answer)."""
    specials = {tokenizer.encode_special(name) for name in tokenizer.get_special_tokens()}
    turn_starts = {tokenizer.get_bos_token_id(), tokenizer.encode_special("<|user_start|>")}
    texts = []
    for row_inputs, row_targets in zip(inputs.tolist(), targets.tolist()):
        starts = [i for i, t in enumerate(row_inputs) if t in turn_starts] + [len(row_inputs)]
        for a, b in zip(starts, starts[1:]):  # a turn never starts with an image: i - 1 is in the row
            runs = sum(row_inputs[i] == image_token_id != row_inputs[i - 1] for i in range(a, b))
            if runs:
                ids = [t for t in row_targets[a:b] if t != -1 and t not in specials]
                texts += [torch.tensor(list(tokenizer.decode(ids).encode("utf-8")), dtype=torch.long)] * runs
    return texts


def det_targets_of(inputs, targets, tokenizer, image_token_id):
    """The detection head's targets for each image of the batch, in the batch's image order: the boxes of the
    answer of the turn that shows it (detection.targets_from_answer: a grounding answer's <|det|> boxes). An answer
    without boxes gives none: its image teaches the head where nothing is. Turns as in ctc_targets_of."""
    turn_starts = {tokenizer.get_bos_token_id(), tokenizer.encode_special("<|user_start|>")}
    found = []
    for row_inputs, row_targets in zip(inputs.tolist(), targets.tolist()):
        starts = [i for i, t in enumerate(row_inputs) if t in turn_starts] + [len(row_inputs)]
        for a, b in zip(starts, starts[1:]):
            runs = sum(row_inputs[i] == image_token_id != row_inputs[i - 1] for i in range(a, b))
            if runs:
                found += [targets_from_answer(tokenizer.decode([t for t in row_targets[a:b] if t != -1]))] * runs
    return found


def det_positions(model, inputs, targets, doc_ids):
    """(images, their <|image|> tokens, GPT states the head reads with them) of a batch: the detection head's
    share of training_flops."""
    lengths = [n for row in inputs for n in image_runs(row, model.image_token_id)]
    contexts = image_contexts(inputs, lengths, model.image_token_id, targets, doc_ids)
    return len(lengths), sum(lengths), sum(end - start for _, start, end in contexts)


def lm_objective(losses, spans, teacher_weight):
    """
    The language-model loss a step trains on and the span sums behind it (evaluate.span_sums, detached), from
    the supervised tokens' losses and span ids, flat (GPT.forward's loss_reduction="supervised" order).
    (teacher_weight x teacher sum + student sum) / (teacher_weight x teacher tokens + student tokens): the mean
    over the supervised tokens with each teacher token counted teacher_weight times. At teacher_weight 1 that is
    the plain mean over all of them, the loss without spans; a batch without teacher spans (single-turn records)
    gives the student mean at any weight; teacher_weight 0 learns the asked answers alone.
    """
    sums = span_sums(losses, spans)
    return (teacher_weight * sums[0] + sums[2]) / (teacher_weight * sums[1] + sums[3]), sums.detach()


def views_of(images):
    """(height, width) of every view the encoder runs for these images: each global view, then each tile."""
    views = []
    for image in images:
        views.append(tuple(image.global_view.shape[-2:]))
        if image.tiles is not None:
            views += [tuple(image.tiles.shape[-2:])] * image.tiles.size(0)
    return views


def peak_flops(device):
    """Dense bf16 peak of the GPU, for MFU; None where we do not know it (CPU, MPS, unknown GPUs)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, flops in (("H100", 989e12), ("H200", 989e12), ("A100", 312e12), ("L40", 181e12), ("4090", 165e12)):
        if key in name:
            return flops
    return None


@torch.no_grad()
def calibrate_image_norm(model, records, tokenizer, image_mode, max_tokens, device, batch_size, count=256):
    """
    Set the projector-output norm's running statistics to those of the current encoder over the first `count`
    training records ("precise BN"). Training normalises each batch by its own statistics; the running averages
    lag behind an encoder that changes fast (a tier-1 overfit), so they are recomputed before every eval and save:
    then eval-time features are what training saw. The same records on every rank give the same statistics.
    """
    norm = getattr(model.encoder, "proj_norm", None)
    if norm is None:
        return
    was_training, momentum = model.encoder.training, norm.momentum
    norm.reset_running_stats()
    norm.momentum = None  # a cumulative average over the calibration batches
    model.encoder.train()
    batch_size = max(batch_size, 2)
    for _, _, images, _ in eval_batches(records[:count], tokenizer, batch_size, max_tokens, image_mode, device):
        if len(images) > 1:
            model.encoder.encode_images(images)
    # BatchNorm keeps the unbiased variance but a training batch is normalised by its biased one: keep what
    # training divides by (10 images per batch would otherwise see features 5% smaller at eval)
    norm.running_var.mul_((batch_size - 1) / batch_size)
    norm.momentum = momentum
    model.encoder.train(was_training)


# -----------------------------------------------------------------------------
# One run

@dataclass
class Run:
    """What a run holds from setup to the end; the steps below read and advance it."""
    cfg: dict
    ddp: bool
    rank: int
    world_size: int
    device: torch.device
    checkpoint_dir: str
    model: torch.nn.Module  # the VLM (train_model wraps it in DDP when there are several ranks)
    train_model: torch.nn.Module
    tokenizer: object
    image_mode: object  # an image_process.ImageMode
    adapter: dict  # None for a full run
    optimizer: torch.optim.Optimizer
    records: list
    val_records: list
    texts: list  # text-only conversations to mix in, or None
    max_tokens: int  # longest sample + 1 (the shifted target)
    device_batch_size: int
    grad_accum: int
    autocast: object
    logger: object
    step: int = 0
    start_step: int = 0
    loader_state: dict = None  # the data position after the last batch a step consumed
    smooth_loss: float = 0.0
    total_time: float = 0.0  # seconds of training steps, evals excluded
    bad_steps: int = 0
    peak_flops: float = None  # the GPU's bf16 peak, for MFU; None where we do not know it
    flop_stages: dict = None  # weights by FLOP stage, counted only when peak_flops is known
    metrics: dict = field(default_factory=dict)
    history: dict = None  # for report.md: the steps and evals so far, the run's wall clock
    samples: list = None  # the last eval's scored greedy answers (rank 0), for the report's prediction sheet

    @property
    def master(self):
        return self.rank == 0


def setup(cfg):
    """Everything a run needs before its first step: processes, model, optimizer, data; restored on --resume."""
    history = new_history()  # the report's wall clock starts before the model is built
    ddp, rank, local_rank, world_size, device = compute_init(cfg["device_type"], seed=cfg["seed"])
    checkpoint_dir = os.path.join(get_base_dir(), cfg["model_tag"])
    model, tokenizer, image_mode, resume_step, adapter = setup_model(cfg, checkpoint_dir, device, rank == 0)
    setup_det_head(model, cfg, resume_step is not None)
    freeze(model, freeze_sam=cfg["freeze_sam"], freeze_compressor=cfg["freeze_compressor"])
    if world_size > 1:
        torch.manual_seed(cfg["seed"] + rank)  # same weights everywhere (built above), but each rank its own dropout
    model.encoder.gradient_checkpointing = model.gpt.gradient_checkpointing = cfg["grad_checkpointing"]
    model.train()
    lrs = {name: cfg[f"{name}_lr"] for name, _ in COMPONENTS}
    wds = {name: cfg[f"{name}_wd"] for name, _ in COMPONENTS}
    optimizer = torch.optim.AdamW(group_parameters(model, lrs, wds), betas=(cfg["beta1"], cfg["beta2"]), eps=1e-8)
    n_params = sum(p.numel() for p in model.parameters())
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print0(f"model {cfg['model']} | {n_params:,} parameters, {n_train:,} trainable | image mode {image_mode} | "
           f"groups: {', '.join(g['name'] for g in optimizer.param_groups)}")

    records = load_records(cfg["data"], cfg["strict"])
    val_records = load_records(cfg["val_data"], cfg["strict"]) if cfg["val_data"] else records
    if cfg["text_ratio"] > 0 and not cfg["text_data"]:
        raise RunError(f"--text_ratio={cfg['text_ratio']} mixes text into the batches, but no --text_data was "
                         f"given: pass a JSONL of conversations, or --text_ratio=0 to train on images alone")
    texts = load_conversations(cfg["text_data"], cfg["strict"]) if cfg["text_ratio"] > 0 else None
    max_tokens = sequence_length(model, tokenizer, records, texts, image_mode, cfg["max_seq_len"]) + 1
    device_batch_size, grad_accum = batch_plan(cfg["total_batch_size"], cfg["device_batch_size"], world_size)
    print0(f"{len(records):,} training records, {len(val_records):,} validation records | "
           f"{cfg['total_batch_size']} examples per step = {device_batch_size} x {world_size} ranks x "
           f"{grad_accum} accumulation")

    # text-only batches leave the encoder without gradients: DDP must then be told to expect unused parameters
    train_model = DDP(model, device_ids=[local_rank] if device.type == "cuda" else None,
                      find_unused_parameters=texts is not None) if ddp else model
    run = Run(cfg, ddp, rank, world_size, device, checkpoint_dir, model, train_model, tokenizer, image_mode, adapter,
              optimizer, records, val_records, texts, max_tokens, device_batch_size, grad_accum,
              autocast_context(device.type), get_wandb(cfg["run"], "nanovlm", cfg, rank), history=history)
    run.peak_flops = peak_flops(device)
    run.flop_stages = weight_elements_by_stage(model) if run.peak_flops else None
    if resume_step is not None:
        restore(run, resume_step)
    elif run.master:
        tokenizer.save(os.path.join(checkpoint_dir, "tokenizer"))  # the checkpoint dir is self-contained
    return run


def restore(run, step):
    """Continue from a saved step: every rank its own RNG and data position, the optimizer state rank 0's
    (plain AdamW: the same on every rank), and the loop's running values."""
    _, rank_state, meta = load_checkpoint(run.checkpoint_dir, step, "cpu", load_optimizer=True, rank=run.rank,
                                          load_model=False)
    rank0_state = rank_state if run.rank == 0 else load_checkpoint(
        run.checkpoint_dir, step, "cpu", load_optimizer=True, rank=0, load_model=False)[1]
    run.optimizer.load_state_dict(rank0_state["optimizer"])  # moves the state to each parameter's device
    for group in run.optimizer.param_groups:  # learning rates come from this run's flags, not the saved ones
        group["initial_lr"] = run.cfg[f"{group['name']}_lr"]
    torch.set_rng_state(rank_state["rng"])
    if run.device.type == "cuda" and rank_state.get("cuda_rng") is not None:
        torch.cuda.set_rng_state(rank_state["cuda_rng"], run.device)
    run.step = run.start_step = step
    run.loader_state = rank_state["loader_state"]
    run.smooth_loss = meta["loop_state"]["smooth_loss"]
    run.total_time = meta["loop_state"]["total_time"]
    resume_history(run.history, run.checkpoint_dir, step)


def skip_step(run, what):
    """A step whose loss or gradients are not finite is not applied; several in a row mean the run diverged."""
    run.optimizer.zero_grad(set_to_none=True)
    run.bad_steps += 1
    print0(f"step {run.step:05d} | {what} is not finite: step skipped ({run.bad_steps} in a row)")
    if run.bad_steps >= run.cfg["max_bad_steps"]:
        kind = "losses" if what.startswith("loss") else "steps"
        raise RunError(f"{run.bad_steps} non-finite {kind} in a row: stopping")
    run.step += 1


def train_step(run, loader, batch):
    """
    One optimizer step over grad_accum micro-batches, starting with `batch`. Returns the next batch and the
    step's numbers for the log line (None for a skipped step).
    """
    cfg, model = run.cfg, run.model
    use_ctc = model.encoder.config.ctc_rows > 0 and cfg["ctc_weight"] > 0
    use_det = model.det_head is not None
    if run.device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.time()
    tokens, padding, flops, loss_sum, ctc_sum, span_sum, det_sum = 0, 0, 0, 0.0, 0.0, 0.0, 0.0
    for micro in range(run.grad_accum):
        inputs, targets, images, doc_ids, spans, run.loader_state = batch
        padding += (doc_ids == 0).sum()  # row padding: in tok/sec, but no sample's
        # the mask only where a row holds several samples: one per row is plain causal attention, and faster
        packed = doc_ids if cfg["pack"] and inputs.size(0) < run.device_batch_size else None
        sync = not run.ddp or micro == run.grad_accum - 1  # DDP all-reduces only on the last micro-batch
        with (run.train_model.no_sync() if not sync else contextlib.nullcontext()), run.autocast:
            det_targets = det_targets_of(inputs, targets, run.tokenizer, model.image_token_id) if use_det else None
            # per-token losses of the supervised tokens: the objective weighs the teacher spans (lm_objective)
            if use_ctc:
                ctc_targets = ctc_targets_of(inputs, targets, run.tokenizer, model.image_token_id)
                losses, ctc, *det = run.train_model(inputs, images=images, targets=targets, ctc_targets=ctc_targets,
                                                    doc_ids=packed, loss_reduction="supervised",
                                                    det_targets=det_targets)
                ctc_sum += ctc.detach()
                loss, sums = lm_objective(losses, spans[targets != -1], cfg["teacher_weight"])
                total = loss + cfg["ctc_weight"] * ctc
            else:
                out = run.train_model(inputs, images=images, targets=targets, doc_ids=packed,
                                      loss_reduction="supervised", det_targets=det_targets)
                losses, *det = out if use_det else (out,)
                loss, sums = lm_objective(losses, spans[targets != -1], cfg["teacher_weight"])
                total = loss
            if use_det:  # each of the head's losses for the log line; its weighted sum joins the total
                det_sum += torch.stack([det[0][k].detach() for k in DET_LOSSES])
                total = total + cfg["det_weight"] * det[0]["det_total"]
        (total / run.grad_accum).backward()
        loss_sum += loss.detach()
        span_sum += sums
        tokens += inputs.numel()
        if run.flop_stages:
            flops += model.training_flops(*inputs.shape, views_of(images), (targets != -1).sum(), run.flop_stages,
                                          det_positions(model, inputs, targets, packed) if use_det else None)
        batch = next(loader)
    train_loss = loss_sum / run.grad_accum
    if run.ddp:
        dist.all_reduce(train_loss, op=dist.ReduceOp.AVG)
        dist.all_reduce(span_sum)
    if not torch.isfinite(train_loss):
        skip_step(run, f"loss {train_loss.item()}")
        return batch, None
    # the gradient norm (clipped to grad_clip, if set): a finite loss can still give inf/NaN gradients
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg["grad_clip"] or float("inf"))
    if not torch.isfinite(grad_norm):
        skip_step(run, f"gradient norm {grad_norm.item()}")
        return batch, None
    run.bad_steps = 0
    lrm = lr_multiplier(run.step, cfg["num_iterations"], cfg["warmup_ratio"], cfg["warmdown_ratio"],
                        cfg["final_lr_frac"])
    for group in run.optimizer.param_groups:
        group["lr"] = group["initial_lr"] * lrm
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    if run.device.type == "cuda":
        torch.cuda.synchronize()
    dt = time.time() - t0
    ctc_loss = float(ctc_sum) / run.grad_accum if use_ctc else None  # this rank's, for the log line only
    det = dict(zip(DET_LOSSES, (det_sum / run.grad_accum).tolist())) if use_det else None  # this rank's too
    teacher_sum, n_teacher, student_sum, n_student = span_sum.tolist()
    teacher, student = (teacher_sum / n_teacher, student_sum / n_student) if n_teacher else (None, None)
    return batch, dict(loss=train_loss.item(), ctc=ctc_loss, lrm=lrm, dt=dt, tokens=tokens * run.world_size,
                       flops=float(flops), pad=float(padding) / tokens, teacher=teacher, student=student, det=det)


def log_step(run, stats):
    """The step line, in nanochat's shape; every 10 steps to wandb too."""
    beta = 0.9
    run.smooth_loss = beta * run.smooth_loss + (1 - beta) * stats["loss"]
    debiased = run.smooth_loss / (1 - beta ** (run.step + 1))
    if run.step - run.start_step > 2:
        run.total_time += stats["dt"]  # the first steps warm up the allocator and threads
    tok_per_sec = int(stats["tokens"] / stats["dt"])
    # this rank's share of its GPU
    mfu = f"{100 * stats['flops'] / stats['dt'] / run.peak_flops:.2f}" if run.peak_flops else "-"
    ctc_part = f" | ctc {stats['ctc']:.4f}" if stats["ctc"] is not None else ""
    det = stats["det"]  # the detection head's losses, each before its weight
    det_part = f" | det l1 {det['det_l1']:.4f} giou {det['det_giou']:.4f} obj {det['det_obj']:.4f}" if det else ""
    # each span's own mean, in steps whose data has example turns (K-shot conversations) to tell apart
    span_part = f" | teacher {stats['teacher']:.4f} student {stats['student']:.4f}" if stats["teacher"] is not None \
        else ""
    n = run.cfg["num_iterations"]
    # pad: the share of this rank's tokens in the step that are row padding (tok/sec counts them, as it runs them)
    print0(f"step {run.step:05d}/{n:05d} ({100 * run.step / n:.2f}%) | loss {debiased:.6f}{ctc_part}{span_part}"
           f"{det_part} | lrm {stats['lrm']:.2f} | dt {stats['dt'] * 1000:.1f}ms | tok/sec {tok_per_sec:,} | pad "
           f"{100 * stats['pad']:.1f}% | mfu {mfu} | total time {run.total_time / 60:.2f}m")
    record_step(run.history, run.step, stats, debiased)
    if run.step % 10 == 0:
        spans = {"train/teacher_loss": stats["teacher"], "train/student_loss": stats["student"]} \
            if stats["teacher"] is not None else {}
        det_logs = {f"train/{k}": v for k, v in det.items()} if det else {}
        run.logger.log({"step": run.step, "train/loss": debiased, "train/lrm": stats["lrm"], "train/dt": stats["dt"],
                        "train/tok_per_sec": tok_per_sec, **spans, **det_logs})


def evaluate(run):
    """Validation loss, image gap and feature spread (all ranks), then greedy samples (rank 0); prints the eval
    line with its warnings and returns the metrics."""
    cfg, model = run.cfg, run.model
    model.eval()
    batches = eval_batches(run.val_records[:cfg["eval_records"]], run.tokenizer, run.device_batch_size,
                           model.config.sequence_len + 1, run.image_mode, run.device, run.rank, run.world_size)
    with run.autocast:
        sums, spread = validation_sums(model, batches, run.device)
    if run.world_size > 1:
        dist.all_reduce(sums)
    metrics = {"val/loss": (sums[0] / sums[1].clamp(min=1)).item()}
    if sums[5] > 0:  # records with example turns: each span's own mean
        metrics["val/teacher_loss"] = (sums[4] / sums[5]).item()
        metrics["val/student_loss"] = (sums[6] / sums[7].clamp(min=1)).item()
    if sums[3] > 0:
        metrics["val/image_gap"] = (sums[2] / sums[3]).item()
    if spread is not None:
        metrics["val/feature_spread"] = spread  # rank 0's first batch
    if run.master and cfg["eval_samples"] > 0:
        summary = summarize(evaluate_records(model, run.tokenizer, run.val_records[:cfg["eval_samples"]],
                                             run.image_mode, cfg["max_new_tokens"], run.autocast))
        metrics.update({"val/exact": summary["exact"], "val/cer": summary["cer"]})
        if summary["head_det_rate"] is not None:  # the detection head's boxes, on the samples with boxes
            metrics.update({"val/det_rate": summary["head_det_rate"], "val/det_iou": summary["head_iou"]})
        run.samples = summary["samples"]
        first = summary["samples"][0]
        print0(f"sample {first['id']}: {first['prediction'][:120]!r}")
    line = f"Step {run.step:05d} | val loss {metrics['val/loss']:.4f}"
    if "val/teacher_loss" in metrics:
        line += f" | teacher {metrics['val/teacher_loss']:.4f} student {metrics['val/student_loss']:.4f}"
    if "val/image_gap" in metrics:
        line += f" | image gap {metrics['val/image_gap']:.4f}"
    if "val/feature_spread" in metrics:
        line += f" | feature spread {metrics['val/feature_spread']:.3f}"
    if "val/exact" in metrics:
        n_scored = min(cfg["eval_samples"], len(run.val_records))
        line += f" | exact {metrics['val/exact']}/{n_scored} | cer {metrics['val/cer']:.4f}"
    if "val/det_rate" in metrics:
        line += f" | det rate {metrics['val/det_rate']:.4f} iou {metrics['val/det_iou']:.4f}"
    if metrics.get("val/image_gap", 1.0) < IMAGE_GAP_WARN:
        line += " | WARNING: the answers barely depend on the image (swapping images leaves the loss as it is)"
    if metrics.get("val/feature_spread", 1.0) < FEATURE_SPREAD_WARN:
        line += " | WARNING: the encoder gives every image the same features (collapsed)"
    print0(line)
    record_eval(run.history, run.step, metrics, min(cfg["eval_samples"], len(run.val_records)))
    run.logger.log({"step": run.step, **metrics})
    model.train()
    return metrics


def save(run):
    """This step's checkpoint: weights (or the adapters alone), meta, and each rank's optimizer/RNG/data state.
    The meta keeps the training prompts, so that reading asks the model what it learned to answer."""
    model = run.model
    meta = dict(model_meta(model), image_mode=str(run.image_mode), tokenizer_dir="tokenizer", user_config=run.cfg,
                prompts=prompt_counts(run.records),
                loader_state=run.loader_state, metrics=run.metrics,
                loop_state={"smooth_loss": run.smooth_loss, "total_time": run.total_time})
    rank_state = {"rng": torch.get_rng_state(), "loader_state": run.loader_state,
                  "cuda_rng": torch.cuda.get_rng_state(run.device) if run.device.type == "cuda" else None}
    if run.master:  # plain AdamW: every rank holds the same state, one copy is enough
        rank_state["optimizer"] = run.optimizer.state_dict()
    if run.adapter:
        save_checkpoint(run.checkpoint_dir, run.step, None, dict(meta, adapter=run.adapter), rank_state, run.rank,
                        adapter_model=model)
    else:
        save_checkpoint(run.checkpoint_dir, run.step, model.state_dict(), meta, rank_state, run.rank)
    if run.master:
        write_report(run)  # at every save: an interrupted run has the report of its last checkpoint
    print0(f"saved {run.checkpoint_dir} step {run.step}")


def due(every, step, start_step):
    return every > 0 and step % every == 0 and step > start_step


def train(cfg):
    run = setup(cfg)
    loader = vision_batches(run.records, run.tokenizer, run.device_batch_size, run.max_tokens, run.image_mode,
                            run.device, seed=cfg["seed"], rank=run.rank, world_size=run.world_size, texts=run.texts,
                            text_ratio=cfg["text_ratio"], resume_state=run.loader_state, strict=cfg["strict"],
                            num_workers=cfg["loader_workers"], pack=cfg["pack"])
    batch = next(loader)
    while True:
        last_step = run.step == cfg["num_iterations"]
        evaluating = last_step or due(cfg["eval_every"], run.step, run.start_step)
        saving = last_step or due(cfg["save_every"], run.step, run.start_step)
        if evaluating or saving:
            calibrate_image_norm(run.model, run.records, run.tokenizer, run.image_mode, run.max_tokens, run.device,
                                 run.device_batch_size)
        if evaluating:
            run.metrics = evaluate(run)
        if saving:
            save(run)
        if last_step:
            break
        batch, stats = train_step(run, loader, batch)
        if stats is not None:
            log_step(run, stats)
            run.step += 1

    if run.device.type == "cuda":
        print0(f"peak memory {torch.cuda.max_memory_allocated() / 1024 ** 2:.0f} MiB")
    print0(f"total training time {run.total_time / 60:.2f}m")
    run.logger.finish()
    compute_cleanup()
    return run.metrics
