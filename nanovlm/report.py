"""
The run report: every training run keeps <checkpoint dir>/report.md, a short markdown card of what it did (nanochat
writes one too): the command and config, the data, the parameters by component, loss / image gap / CER over steps
as PNG plots, the last eval, a sheet of its predictions, wall time and tokens/s.

The loop hands over the numbers it computes anyway (record_step, record_eval) and calls write_report at every
save, so an interrupted run has the report of its last checkpoint. The history is kept beside the checkpoints in
report_history.json: --resume reads it back, drops what came after the resumed step and appends.
"""

import json
import os
import shlex
import sys
import time

import torch.nn as nn

from nanovlm.common import atomic_write
from nanovlm.deepencoder import LayerNorm2d
from nanovlm.evaluate import IMAGE_GAP_WARN
from nanovlm.nf4 import Linear4bit, param_elements
from nanovlm.sheet import make_sheet
from nanovlm.vlm import component_of

REPORT, HISTORY, SHEET = "report.md", "report_history.json", "report_predictions.png"
PLOTS = {"loss": "report_loss.png", "image_gap": "report_image_gap.png", "cer": "report_cer.png"}

# -----------------------------------------------------------------------------
# Parameters by area (also what scripts/trainables.py prints)

AREAS = ["SAM", "compressor", "CLIP", "projector", "GPT attention", "GPT MLP", "embeddings", "lm_head", "norms",
         "LoRA", "detection head"]
COMPONENT_AREAS = {"sam": "SAM", "compressor": "compressor", "clip": "CLIP", "projector": "projector",
                   "embeddings": "embeddings", "lm_head": "lm_head", "lora": "LoRA", "det_head": "detection head"}


def area_of(name, module):
    """The area a parameter belongs to: its component (vlm.component_of), with norms and the GPT's attention and
    MLP told apart (the detection head is one area, norms and all)."""
    component = component_of(name)
    if component not in ("lora", "det_head") and isinstance(module, (nn.LayerNorm, LayerNorm2d)):
        return "norms"
    if component == "gpt_matrices":
        return "GPT attention" if ".attn." in name else "GPT MLP"
    return COMPONENT_AREAS[component]


def census(vlm):
    """{area: [total, trainable, held in 4 bits]} in elements (a 4-bit weight counts its weights, not its bytes)."""
    rows = {area: [0, 0, 0] for area in AREAS}
    for name, module in vlm.named_modules():
        for param_name, p in module.named_parameters(recurse=False):
            n = param_elements(module, param_name, p)
            row = rows[area_of(f"{name}.{param_name}", module)]
            row[0] += n
            row[1] += n if p.requires_grad else 0
            row[2] += n if isinstance(module, Linear4bit) and param_name == "weight" else 0
    return rows


# -----------------------------------------------------------------------------
# The history: one record per step and per eval, with the run's wall clock

def new_history():
    """No records yet; the run's clock starts now."""
    return {"steps": [], "evals": [], "t0": time.time()}


def clock(history):
    return round(time.time() - history["t0"], 3)


def resume_history(history, checkpoint_dir, step):
    """Put before `history` (this process's, empty so far) what the run saved up to the checkpoint it resumes at
    `step`. Records of a later save, or of steps run after it before the run stopped, are dropped: the resumed
    run does them again. A checkpoint from before reports has none: the report starts at the resumed step."""
    path = os.path.join(checkpoint_dir, HISTORY)
    if not os.path.exists(path):
        return
    with open(path) as f:
        saved = json.load(f)
    history["steps"] = [s for s in saved["steps"] if s["step"] < step]
    history["evals"] = [e for e in saved["evals"] if e["step"] <= step]
    history["t0"] -= max([r["time"] for r in history["steps"] + history["evals"]], default=0.0)


def record_step(history, step, stats, smooth_loss):
    """A training step: its loss, the smoothed loss of the log line, the CTC loss (None without), and speed."""
    history["steps"].append({"step": step, "loss": round(stats["loss"], 6), "smooth_loss": round(smooth_loss, 6),
                             "ctc": None if stats["ctc"] is None else round(stats["ctc"], 6), "lrm": stats["lrm"],
                             "dt": round(stats["dt"], 6), "tokens": stats["tokens"], "time": clock(history)})


def record_eval(history, step, metrics, n_scored):
    """An eval: its metrics ("val/loss" -> "loss", ...) and how many samples the exact count is out of."""
    history["evals"].append(dict({k.split("/", 1)[1]: v for k, v in metrics.items()}, step=step, n_scored=n_scored,
                                 time=clock(history)))


# -----------------------------------------------------------------------------
# Plots (matplotlib, Agg: no display needed, no pyplot state)

def plot(path, title, ylabel, series, hline=None, log=False):
    """Lines over steps, series = [(label, steps, values, matplotlib style)], to a PNG at path."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter, MaxNLocator
    fig = Figure(figsize=(6, 3.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for label, steps, values, style in series:
        ax.plot(steps, values, label=label, **style)
    if hline is not None:
        ax.axhline(hline[1], color="gray", linestyle="--", linewidth=1, label=hline[0])
    if log:  # a loss falls by decades; plain numbers on the axis, not 6x10^0
        ax.set_yscale("log")
        for axis in (ax.yaxis.set_major_formatter, ax.yaxis.set_minor_formatter):
            axis(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set(title=title, xlabel="step", ylabel=ylabel)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))


def eval_series(history, key, label):
    evals = [e for e in history["evals"] if e.get(key) is not None]
    return (label, [e["step"] for e in evals], [e[key] for e in evals], {"marker": "o"})


def make_plots(history, directory):
    """The plots that have data, {name: file name}: train and val loss, image gap, CER over steps."""
    steps = history["steps"]
    series = {"loss": [("train loss", [s["step"] for s in steps], [s["loss"] for s in steps],
                        {"alpha": 0.3, "linewidth": 1}),
                       ("train loss (smoothed)", [s["step"] for s in steps], [s["smooth_loss"] for s in steps], {}),
                       eval_series(history, "loss", "val loss")],
              "image_gap": [eval_series(history, "image_gap", "image gap")],
              "cer": [eval_series(history, "cer", "CER")]}
    if any(s["ctc"] is not None for s in steps):
        series["loss"].append(("CTC loss", [s["step"] for s in steps if s["ctc"] is not None],
                               [s["ctc"] for s in steps if s["ctc"] is not None], {"linewidth": 1}))
    titles = {"loss": ("loss", "nats per answer token"), "image_gap": ("image gap", "nats per answer token"),
              "cer": ("CER of the greedy samples", "CER")}
    made = {}
    for name, lines in series.items():
        lines = [line for line in lines if line[1]]
        if lines:
            plot(os.path.join(directory, PLOTS[name]), *titles[name], lines, log=name == "loss",
                 hline=("warning below", IMAGE_GAP_WARN) if name == "image_gap" else None)
            made[name] = PLOTS[name]
    return made


# -----------------------------------------------------------------------------
# report.md

def command_line():
    """How this process was started: `python -m MODULE ARGS` for a module (python -m, torchrun -m), else argv."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    head = ["python", "-m", spec.name] if spec else ["python", sys.argv[0]]
    return shlex.join(head + sys.argv[1:])


def duration(seconds):
    return f"{seconds:.1f} s" if seconds < 120 else f"{seconds / 60:.1f} min" if seconds < 7200 else \
        f"{seconds / 3600:.2f} h"


def eval_row(e):
    """The eval line's numbers, formatted as it prints them."""
    cells = [f"{e['step']}", f"{e['loss']:.4f}"]
    cells.append(f"{e['image_gap']:.4f}" if "image_gap" in e else "-")
    cells.append(f"{e['feature_spread']:.3f}" if "feature_spread" in e else "-")
    cells += [f"{e['exact']}/{e['n_scored']}", f"{e['cer']:.4f}"] if "exact" in e else ["-", "-"]
    if "det_rate" in e:  # a model with a detection head: its boxes' detection rate and IoU
        cells += [f"{e['det_rate']:.4f}", f"{e['det_iou']:.4f}"]
    return "| " + " | ".join(cells) + " |"


def data_lines(run):
    cfg = run.cfg
    lines = ["| | data | records |", "|---|---|---|", f"| train | `{cfg['data']}` | {len(run.records):,} |",
             f"| validation | " + (f"`{cfg['val_data']}`" if cfg["val_data"] else "the training data") +
             f" | {len(run.val_records):,} |"]
    if run.texts is not None:
        lines.append(f"| text ({cfg['text_ratio']:.0%} of the samples) | `{cfg['text_data']}` | {len(run.texts):,} |")
    return lines + ["", f"Sequence length {run.max_tokens - 1} tokens; {cfg['total_batch_size']} examples per step = "
                        f"{run.device_batch_size} x {run.world_size} ranks x {run.grad_accum} accumulation; "
                        f"eval: loss on {min(cfg['eval_records'], len(run.val_records))} records, greedy answers to "
                        f"{min(cfg['eval_samples'], len(run.val_records))}."]


def parameter_lines(model):
    rows = {area: row for area, row in census(model).items() if row[0]}
    rows["all"] = [sum(column) for column in zip(*rows.values())]
    quantized = rows["all"][2] > 0
    lines = ["| area | parameters | trainable" + (" | 4-bit |" if quantized else " |"),
             "|---|---:|---:|" + ("---:|" if quantized else "")]
    for area, (total, trainable, four_bit) in rows.items():
        lines.append(f"| {area} | {total:,} | {trainable:,} |" + (f" {four_bit:,} |" if quantized else ""))
    return lines


def sheet_lines(run):
    """The prediction sheet of the last eval this process ran with samples (none yet: says so)."""
    scored = [e for e in run.history["evals"] if "cer" in e]
    if not run.samples or not scored:
        return ["None: no eval with greedy samples in this process yet (--eval_samples=0, or a resumed run before "
                "its first eval)."]
    path = os.path.join(run.checkpoint_dir, SHEET)
    make_sheet(run.val_records[:len(run.samples)], run.samples, path + ".tmp.png")  # Pillow reads the extension
    os.replace(path + ".tmp.png", path)  # the old sheet or the new one, never half of one
    return [f"Step {scored[-1]['step']}: each image, the prediction under it (wrong characters in red), the "
            f"reference below.", "", f"![predictions]({SHEET})"]


def write_report(run):
    """report_history.json, the plots, the prediction sheet and report.md into the checkpoint dir (rank 0 only)."""
    directory, history, cfg = run.checkpoint_dir, run.history, run.cfg
    wall = clock(history)
    atomic_write(os.path.join(directory, HISTORY), json.dumps(dict(history, t0=None)).encode())
    plots = make_plots(history, directory)
    steps = history["steps"]
    dt = sum(s["dt"] for s in steps)
    speed = f"{sum(s['tokens'] for s in steps) / dt:,.0f} tokens/s" if dt else "no steps yet"
    lines = [f"# {cfg['model_tag']}: run report at step {run.step} of {cfg['num_iterations']}", "",
             f"Model `{cfg['model']}`, image mode `{run.image_mode}`, "
             f"{run.world_size} process{'es' if run.world_size > 1 else ''} on "
             f"{run.device.type}. Wall time {duration(wall)} (setup, steps, evals, saves), of it training steps "
             f"{duration(run.total_time)} (as the log counts them); mean speed {speed}.", "",
             "## Command", "", "```", command_line(), "```", "",
             "## Data", "", *data_lines(run), "",
             "## Parameters", "", *parameter_lines(run.model), "",
             "## Last eval", ""]
    if history["evals"]:
        header, rule = "| step | val loss | image gap | feature spread | exact | CER |", "|---|---|---|---|---|---|"
        if "det_rate" in history["evals"][-1]:
            header, rule = header + " det rate | det IoU |", rule + "---|---|"
        lines += [header, rule, eval_row(history["evals"][-1])]
    else:
        lines.append("None yet.")
    lines += ["", "## Curves", ""] + ([f"![{name.replace('_', ' ')}]({path})" for name, path in plots.items()]
                                      or ["None yet."])
    lines += ["", "## Predictions", "", *sheet_lines(run), "",
              "## Config", "", "```", *(f"{k} = {v!r}" for k, v in cfg.items()), "```", ""]
    atomic_write(os.path.join(directory, REPORT), "\n".join(lines).encode())
