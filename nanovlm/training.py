"""
The training loop shared by scripts/vis_tok_train.py (stage 1: everything trains) and scripts/vis_mid_train.py
(stage 2: SAM and the compressor frozen, text mixed in). The scripts hold the hyperparameters as plain
variables and call train(config); everything they share lives here once.

One step: grad_accum micro-batches (inputs, targets, images) -> VLM loss -> backward, clip, AdamW with one
param group per component, LR schedule (warmup, constant, warmdown). Every eval_every steps: validation loss,
a few greedy samples scored with the shared metrics, and the image gap (does the model use the image?).
"""

import contextlib
import os
import re
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from nanovlm.checkpoint import find_last_step, load_checkpoint, load_vlm, relative_base_dir, save_checkpoint
from nanovlm.importers import load_deepseek_ocr_into, load_hf_clip, load_hf_sam, load_nanochat
from nanovlm.lora import ADAPTER_KEYS, prepare_adapters
from nanovlm.common import autocast_context, compute_cleanup, compute_init, get_base_dir, get_wandb, print0
from nanovlm.dataloader import eval_batches, load_conversations, load_records, longest_record, vision_batches
from nanovlm.evaluate import (FEATURE_SPREAD_WARN, IMAGE_GAP_WARN, answer_losses, evaluate_records,
                              feature_spread, summarize, swapped_images)
from nanovlm.tokenizer import get_tokenizer, load_nanochat_tokenizer
from nanovlm.vlm import build_vlm, model_meta, preset_configs, weight_elements_by_stage

# Parameter groups, by full parameter name. Every trainable parameter must match exactly one pattern.
NOT_LORA = r"(?!.*\.lora_[AB]\.)"
PARAM_GROUPS = [
    ("sam", NOT_LORA + r"encoder\.sam\.(?!net_2\.|net_3\.).*"),
    ("compressor", NOT_LORA + r"encoder\.sam\.net_[23]\..*"),
    ("clip", NOT_LORA + r"encoder\.clip\..*"),
    ("projector", NOT_LORA + r"encoder\.(projector\..*|token_ctc_head\..*|image_newline|view_seperator)"),
    ("gpt_matrices", NOT_LORA + r"gpt\.transformer\.h\.\d+\..*"),
    ("embeddings", r"gpt\.transformer\.wte\.weight"),
    ("lm_head", r"gpt\.lm_head\.weight"),
    ("lora", r".*\.lora_[AB]\.weight"),
]


def group_parameters(model, lrs, weight_decays):
    """
    AdamW param groups, one per component that has trainable parameters. Stops with a list of offenders if a
    trainable parameter matches no group or several (a new module must be given a home, not silently skipped).
    """
    members = {name: [] for name, _ in PARAM_GROUPS}
    problems = []
    for pname, p in model.named_parameters():
        if not p.requires_grad:
            continue
        hits = [g for g, pattern in PARAM_GROUPS if re.fullmatch(pattern, pname)]
        if len(hits) != 1:
            problems.append(f"{pname} ({'no group' if not hits else 'groups ' + ', '.join(hits)})")
        else:
            members[hits[0]].append(p)
    if problems:
        raise SystemExit("parameter groups do not cover the model exactly once:\n  " + "\n  ".join(problems))
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


def freeze(model, cfg):
    """Stage 2 freezes SAM and/or the compressor. Frozen parameters never reach the optimizer."""
    for name, p in model.encoder.sam.named_parameters():
        if ".lora_" in name:
            continue  # adapters put on SAM on purpose keep training
        is_compressor = name.startswith(("net_2.", "net_3."))
        if (cfg["freeze_sam"] and not is_compressor) or (cfg["freeze_compressor"] and is_compressor):
            p.requires_grad_(False)


def ctc_targets_of(inputs, targets, tokenizer, image_token_id):
    """The text each image of the batch shows, as byte tensors for the CTC read-out: the answer of every row that
    holds an image (its supervised tokens without the special ones), in the batch's image order."""
    specials = {tokenizer.encode_special(name) for name in tokenizer.get_special_tokens()}
    texts = []
    for row in range(inputs.size(0)):
        if (inputs[row] == image_token_id).any():
            ids = [t for t in targets[row].tolist() if t != -1 and t not in specials]
            texts.append(torch.tensor(list(tokenizer.decode(ids).encode("utf-8")), dtype=torch.long))
    return texts


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


def build_model(cfg, device):
    """
    (model, tokenizer, image_mode, base) for a fresh run: a preset, optionally initialised from other weights.
    base = (checkpoint dir, step) when the weights come from one of our checkpoints, else None.
    """
    if cfg["start_from"]:
        # a previous nanovlm run (e.g. stage 1 for stage 2): its weights, tokenizer and image mode
        path = cfg["start_from"] if os.path.isdir(cfg["start_from"]) else os.path.join(get_base_dir(), cfg["start_from"])
        model, tokenizer, meta = load_vlm(path, device=device)
        print0(f"starting from {path} step {meta['step']}")
        if "adapter" in meta:
            raise SystemExit(f"--start_from={path} is an adapter run: merge it into a full checkpoint first")
        return model, tokenizer, cfg["image_mode"] or meta["image_mode"], (os.path.abspath(path), meta["step"])
    if cfg["init_from"]:
        gpt, _ = load_nanochat(cfg["init_from"], device=device)
        tokenizer = load_nanochat_tokenizer(cfg["nanochat_tokenizer"])
        gpt.resize_vocab(tokenizer.get_vocab_size())
    else:
        gpt = None
        tokenizer = get_tokenizer(cfg["tokenizer_dir"] or None)
    gpt_config, encoder_config, image_mode = preset_configs(cfg["model"], tokenizer.get_vocab_size(), cfg["image_mode"])
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
    return model, tokenizer, image_mode, None


def setup_model(cfg, checkpoint_dir, device, master):
    """
    (model, tokenizer, image_mode, resume_step, adapter) ready to train: fresh, or the last checkpoint of this run
    when cfg["resume"]. For an adapter run (LoRA / QLoRA) the full-precision base is saved once (unless it is
    already a checkpoint) and adapter = {"config", "base_dir", "base_step"} goes into every meta.
    """
    adapter_config = {k: cfg[k] for k in ADAPTER_KEYS}
    if cfg["resume"]:
        step = find_last_step(checkpoint_dir)
        print0(f"resuming {checkpoint_dir} from step {step}")
        model, tokenizer, meta = load_vlm(checkpoint_dir, step, device=device, training=True)
        return model, tokenizer, meta["image_mode"], step, meta.get("adapter")

    model, tokenizer, image_mode, base = build_model(cfg, device)
    if not (cfg["quant"] or cfg["lora_r"] > 0):
        return model, tokenizer, image_mode, None, None
    if base is None and not (cfg["vision_from"] or cfg["sam_from"] or cfg["clip_from"]):
        print0("warning: adapters over an encoder that starts from random weights; everything the adapters do not "
               "cover stays frozen at random (train the full model first, then --start_from it)")
    if base is None:
        # adapters are saved alone, so their base must be on disk: keep this run's starting weights once
        base = (os.path.join(checkpoint_dir, "base"), 0)
        if master:
            save_checkpoint(base[0], 0, model.state_dict(), dict(model_meta(model), image_mode=image_mode))
            tokenizer.save(os.path.join(base[0], "tokenizer"))
    prepare_adapters(model, adapter_config, training=True)
    adapter = {"config": adapter_config, "base_dir": relative_base_dir(checkpoint_dir, base[0]), "base_step": base[1]}
    return model, tokenizer, image_mode, None, adapter


def train(cfg):
    ddp, rank, local_rank, world_size, device = compute_init(cfg["device_type"], seed=cfg["seed"])
    master = rank == 0
    autocast = autocast_context(device.type)
    synchronize = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    checkpoint_dir = os.path.join(get_base_dir(), cfg["model_tag"])
    logger = get_wandb(cfg["run"], "nanovlm", cfg, rank)

    # ---- model, tokenizer, optimizer; or all of it from the last checkpoint
    model, tokenizer, image_mode, resume_step, adapter = setup_model(cfg, checkpoint_dir, device, master)
    freeze(model, cfg)
    if world_size > 1:
        torch.manual_seed(cfg["seed"] + rank)  # same weights everywhere (built above), but each rank its own dropout
    model.encoder.gradient_checkpointing = cfg["grad_checkpointing"]
    model.gpt.gradient_checkpointing = cfg["grad_checkpointing"]
    model.train()

    names = [name for name, _ in PARAM_GROUPS]
    lrs = {name: cfg[f"{name}_lr"] for name in names}
    wds = {name: cfg[f"{name}_wd"] for name in names}
    optimizer = torch.optim.AdamW(group_parameters(model, lrs, wds), betas=(cfg["beta1"], cfg["beta2"]), eps=1e-8)

    n_params = sum(p.numel() for p in model.parameters())
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print0(f"model {cfg['model']} | {n_params:,} parameters, {n_train:,} trainable | image mode {image_mode} | "
           f"groups: {', '.join(g['name'] for g in optimizer.param_groups)}")

    # ---- data
    records = load_records(cfg["data"], cfg["strict"])
    val_records = load_records(cfg["val_data"], cfg["strict"]) if cfg["val_data"] else records
    if cfg["text_ratio"] > 0 and not cfg["text_data"]:
        raise SystemExit(f"--text_ratio={cfg['text_ratio']} mixes text into the batches, but no --text_data was "
                         f"given: pass a JSONL of conversations, or --text_ratio=0 to train on images alone")
    texts = load_conversations(cfg["text_data"], cfg["strict"]) if cfg["text_ratio"] > 0 else None
    max_tokens = sequence_length(model, tokenizer, records, texts, image_mode, cfg["max_seq_len"]) + 1
    examples_per_micro = cfg["device_batch_size"] * world_size
    assert cfg["total_batch_size"] % examples_per_micro == 0, \
        f"total_batch_size {cfg['total_batch_size']} must be a multiple of device_batch_size x world size = {examples_per_micro}"
    grad_accum = cfg["total_batch_size"] // examples_per_micro
    print0(f"{len(records):,} training records, {len(val_records):,} validation records | "
           f"{cfg['total_batch_size']} examples per step = {cfg['device_batch_size']} x {world_size} ranks x "
           f"{grad_accum} accumulation")

    start_step, loader_state, loop_state = 0, None, {}
    if resume_step is not None:
        # every rank restores its own RNG and data position; the optimizer state (the same on all ranks) is rank 0's
        _, rank_state, meta = load_checkpoint(checkpoint_dir, resume_step, "cpu", load_optimizer=True, rank=rank,
                                              load_model=False)
        rank0_state = rank_state if rank == 0 else load_checkpoint(
            checkpoint_dir, resume_step, "cpu", load_optimizer=True, rank=0, load_model=False)[1]
        optimizer.load_state_dict(rank0_state["optimizer"])  # moves the state to each parameter's device
        for group in optimizer.param_groups:  # learning rates come from this run's flags, not the saved ones
            group["initial_lr"] = lrs[group["name"]]
        torch.set_rng_state(rank_state["rng"])
        if device.type == "cuda" and rank_state.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(rank_state["cuda_rng"], device)
        start_step, loader_state, loop_state = resume_step, rank_state["loader_state"], meta["loop_state"]
    elif master:
        tokenizer.save(os.path.join(checkpoint_dir, "tokenizer"))  # the checkpoint dir is self-contained

    loader = vision_batches(records, tokenizer, cfg["device_batch_size"], max_tokens, image_mode, device,
                            seed=cfg["seed"], rank=rank, world_size=world_size, texts=texts,
                            text_ratio=cfg["text_ratio"], resume_state=loader_state, strict=cfg["strict"],
                            num_workers=cfg["loader_workers"])
    # text-only batches leave the encoder without gradients: DDP must then be told to expect unused parameters
    train_model = DDP(model, device_ids=[local_rank] if device.type == "cuda" else None,
                      find_unused_parameters=texts is not None) if ddp else model

    use_ctc = model.encoder.config.ctc_rows > 0 and cfg["ctc_weight"] > 0
    image_token_id = model.image_token_id
    flops_peak = peak_flops(device)
    flop_stages = weight_elements_by_stage(model) if flops_peak else None  # what trains is fixed from here on
    num_iterations = cfg["num_iterations"]
    smooth_loss = loop_state.get("smooth_loss", 0.0)
    total_time = loop_state.get("total_time", 0.0)
    bad_steps = 0
    metrics = {}
    step = start_step
    batch = next(loader)
    consumed_state = loader_state

    while True:
        last_step = step == num_iterations
        evaluating = last_step or (cfg["eval_every"] > 0 and step % cfg["eval_every"] == 0 and step > start_step)
        saving = last_step or (cfg["save_every"] > 0 and step % cfg["save_every"] == 0 and step > start_step)
        if evaluating or saving:
            calibrate_image_norm(model, records, tokenizer, image_mode, max_tokens, device, cfg["device_batch_size"])
        if evaluating:
            metrics = run_eval(model, tokenizer, val_records, image_mode, cfg, device, rank, world_size, autocast, step)
            logger.log({"step": step, **metrics})
        if saving:
            meta = dict(model_meta(model), image_mode=image_mode, tokenizer_dir="tokenizer", user_config=cfg,
                        loader_state=consumed_state, metrics=metrics,
                        loop_state={"smooth_loss": smooth_loss, "total_time": total_time})
            rank_state = {"rng": torch.get_rng_state(), "loader_state": consumed_state,
                          "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}
            if master:  # plain AdamW: every rank holds the same state, one copy is enough
                rank_state["optimizer"] = optimizer.state_dict()
            optimizer_state = rank_state
            if adapter:
                save_checkpoint(checkpoint_dir, step, None, dict(meta, adapter=adapter), optimizer_state, rank,
                                adapter_model=model)
            else:
                save_checkpoint(checkpoint_dir, step, model.state_dict(), meta, optimizer_state, rank)
            print0(f"saved {checkpoint_dir} step {step}")
        if last_step:
            break

        # ---- one optimizer step
        synchronize()
        t0 = time.time()
        tokens, flops, loss_sum, ctc_sum = 0, 0, 0.0, 0.0
        for micro in range(grad_accum):
            inputs, targets, images, consumed_state = batch
            sync = not ddp or micro == grad_accum - 1  # DDP all-reduces only on the last micro-batch
            with (train_model.no_sync() if not sync else contextlib.nullcontext()), autocast:
                if use_ctc:
                    ctc_targets = ctc_targets_of(inputs, targets, tokenizer, image_token_id)
                    loss, ctc = train_model(inputs, images=images, targets=targets, ctc_targets=ctc_targets)
                    ctc_sum += ctc.detach()
                    total = loss + cfg["ctc_weight"] * ctc
                else:
                    loss = total = train_model(inputs, images=images, targets=targets)
            (total / grad_accum).backward()
            loss_sum += loss.detach()
            tokens += inputs.numel()
            if flop_stages:
                flops += model.training_flops(*inputs.shape, views_of(images), (targets != -1).sum(), flop_stages)
            batch = next(loader)
        train_loss = loss_sum / grad_accum
        if ddp:
            dist.all_reduce(train_loss, op=dist.ReduceOp.AVG)
        ctc_loss = float(ctc_sum) / grad_accum  # this rank's, for the log line only
        lrm = lr_multiplier(step, num_iterations, cfg["warmup_ratio"], cfg["warmdown_ratio"], cfg["final_lr_frac"])
        if not torch.isfinite(train_loss):
            # a NaN/inf step is skipped, not applied; several in a row mean the run has diverged
            optimizer.zero_grad(set_to_none=True)
            bad_steps += 1
            print0(f"step {step:05d} | loss {train_loss.item()} is not finite: step skipped ({bad_steps} in a row)")
            if bad_steps >= cfg["max_bad_steps"]:
                raise SystemExit(f"{bad_steps} non-finite losses in a row: stopping")
            step += 1
            continue
        # the gradient norm (clipped to grad_clip, if set): a finite loss can still give inf/NaN gradients
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg["grad_clip"] or float("inf"))
        if not torch.isfinite(grad_norm):
            optimizer.zero_grad(set_to_none=True)
            bad_steps += 1
            print0(f"step {step:05d} | gradient norm {grad_norm.item()} is not finite: step skipped "
                   f"({bad_steps} in a row)")
            if bad_steps >= cfg["max_bad_steps"]:
                raise SystemExit(f"{bad_steps} non-finite steps in a row: stopping")
            step += 1
            continue
        bad_steps = 0
        for group in optimizer.param_groups:
            group["lr"] = group["initial_lr"] * lrm
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        synchronize()
        dt = time.time() - t0

        # ---- log in nanochat's shape
        train_loss = train_loss.item()
        beta = 0.9
        smooth_loss = beta * smooth_loss + (1 - beta) * train_loss
        debiased = smooth_loss / (1 - beta ** (step + 1))
        if step - start_step > 2:
            total_time += dt  # the first steps warm up the allocator and threads
        tokens *= world_size
        tok_per_sec = int(tokens / dt)
        mfu = f"{100 * float(flops) / dt / flops_peak:.2f}" if flops_peak else "-"  # this rank's share of its GPU
        ctc_part = f" | ctc {ctc_loss:.4f}" if use_ctc else ""
        print0(f"step {step:05d}/{num_iterations:05d} ({100 * step / num_iterations:.2f}%) | loss {debiased:.6f}"
               f"{ctc_part} | lrm {lrm:.2f} | dt {dt * 1000:.1f}ms | tok/sec {tok_per_sec:,} | mfu {mfu} | "
               f"total time {total_time / 60:.2f}m")
        if step % 10 == 0:
            logger.log({"step": step, "train/loss": debiased, "train/lrm": lrm, "train/dt": dt,
                        "train/tok_per_sec": tok_per_sec})
        step += 1

    if device.type == "cuda":
        print0(f"peak memory {torch.cuda.max_memory_allocated() / 1024 ** 2:.0f} MiB")
    print0(f"total training time {total_time / 60:.2f}m")
    logger.finish()
    compute_cleanup()
    return metrics


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
    for _, _, images in eval_batches(records[:count], tokenizer, batch_size, max_tokens, image_mode, device):
        if len(images) > 1:
            model.encoder.encode_images(images)
    # BatchNorm keeps the unbiased variance but a training batch is normalised by its biased one: keep what
    # training divides by (10 images per batch would otherwise see features 5% smaller at eval)
    norm.running_var.mul_((batch_size - 1) / batch_size)
    norm.momentum = momentum
    model.encoder.train(was_training)


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
        raise SystemExit(f"record {name} is {longest} tokens, longer than --max_seq_len={max_seq_len}: raise it "
                         f"(or leave it 0, the longest record) or drop the record")
    capacity = model.gpt.cos.size(1)
    if length > capacity:
        raise SystemExit(f"sequence length {length} (record {name}) exceeds this model's rotary table of {capacity}")
    model.config.sequence_len = max(length, 1)  # what the checkpoint's meta and the eval budgets see
    print0(f"sequence length {length} tokens (longest training record: {name}, {longest} tokens)")
    return length


def run_eval(model, tokenizer, val_records, image_mode, cfg, device, rank, world_size, autocast, step):
    """Validation loss and image gap (all ranks), then generated samples (rank 0)."""
    model.eval()
    max_tokens = model.config.sequence_len + 1
    sums = torch.zeros(4, device=device, dtype=torch.float64)  # loss x tokens, tokens, gap x tokens, gap tokens
    spread = None
    with torch.no_grad(), autocast:
        for inputs, targets, images in eval_batches(val_records[:cfg["eval_records"]], tokenizer,
                                                    cfg["device_batch_size"], max_tokens, image_mode, device,
                                                    rank, world_size):
            if spread is None:
                spread = feature_spread(model.encoder, images)
            # one forward gives the validation loss and the image gap's reference; the swapped images one more
            own = answer_losses(model, inputs, targets, images)
            answer = targets != -1
            sums[0] += own[answer].sum()
            sums[1] += answer.sum()
            other, got_other = swapped_images(inputs, images, model.image_token_id)
            swapped_rows = answer & got_other.to(answer.device)[:, None]
            if swapped_rows.any():
                sums[2] += (answer_losses(model, inputs, targets, other) - own)[swapped_rows].sum()
                sums[3] += swapped_rows.sum()
    if world_size > 1:
        dist.all_reduce(sums)
    metrics = {"val/loss": (sums[0] / sums[1].clamp(min=1)).item()}
    if sums[3] > 0:
        metrics["val/image_gap"] = (sums[2] / sums[3]).item()
    if spread is not None:
        metrics["val/feature_spread"] = spread  # rank 0's first batch
    if rank == 0 and cfg["eval_samples"] > 0:
        summary = summarize(evaluate_records(model, tokenizer, val_records[:cfg["eval_samples"]], image_mode,
                                             cfg["max_new_tokens"], autocast))
        metrics.update({"val/exact": summary["exact"], "val/cer": summary["cer"]})
        first = summary["samples"][0]
        print0(f"sample {first['id']}: {first['prediction'][:120]!r}")
    line = f"Step {step:05d} | val loss {metrics['val/loss']:.4f}"
    if "val/image_gap" in metrics:
        line += f" | image gap {metrics['val/image_gap']:.4f}"
    if "val/feature_spread" in metrics:
        line += f" | feature spread {metrics['val/feature_spread']:.3f}"
    if "val/exact" in metrics:
        n_scored = min(cfg["eval_samples"], len(val_records))
        line += f" | exact {metrics['val/exact']}/{n_scored} | cer {metrics['val/cer']:.4f}"
    if metrics.get("val/image_gap", 1.0) < IMAGE_GAP_WARN:
        line += " | WARNING: the answers barely depend on the image (swapping images leaves the loss as it is)"
    if metrics.get("val/feature_spread", 1.0) < FEATURE_SPREAD_WARN:
        line += " | WARNING: the encoder gives every image the same features (collapsed)"
    print0(line)
    model.train()
    return metrics
