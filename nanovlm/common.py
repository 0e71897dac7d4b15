"""
Things every script needs: where outputs go, which device to use, torchrun/DDP set-up, rank-0 printing, wandb;
and the Linear layer the models are built from.
"""

import contextlib
import os
import platform
import tempfile

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F


def get_base_dir():
    """Outputs (tokenizer, checkpoints) live here: $NANOVLM_BASE_DIR, else ./checkpoints. Created on demand."""
    base_dir = os.environ.get("NANOVLM_BASE_DIR") or os.path.join(os.getcwd(), "checkpoints")
    os.makedirs(base_dir, exist_ok=True)
    return base_dir


def _read_umask():
    mask = os.umask(0)  # the only way to read it is to set it; put it straight back
    os.umask(mask)
    return mask


FILE_MODE = 0o666 & ~_read_umask()  # what open() would give a new file: temp files start at 0600


def atomic_write(path, data):
    """
    Write bytes (or call data(tmp_path) to write the file) so that `path` is either the old file or the complete
    new one, never half of it: write a temp file in the same directory, fsync, then rename over the target.
    """
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp_path = tempfile.mkstemp(dir=directory, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
    try:
        if callable(data):
            os.close(fd)
            data(tmp_path)
        else:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp_path, FILE_MODE)
        os.replace(tmp_path, path)
    except BaseException:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)
        raise
    # make the rename itself durable
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def get_dist_info():
    """(is_ddp, rank, local_rank, world_size), read from the environment torchrun sets."""
    if all(k in os.environ for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE")):
        return True, int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    return False, 0, 0, 1


def print0(s="", **kwargs):
    if int(os.environ.get("RANK", 0)) == 0:
        print(s, **kwargs)


def autodetect_device_type():
    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def compute_init(device_type="", seed=42):
    """
    Pick the device (cuda > mps > cpu unless device_type names one), seed, and join the process group when
    launched by torchrun (nccl on CUDA, gloo otherwise).
    Returns (ddp, rank, local_rank, world_size, device).
    """
    device_type = device_type or autodetect_device_type()
    if device_type not in ("cuda", "mps", "cpu"):
        raise ValueError(f"device_type must be cuda, mps or cpu, got '{device_type}'")
    if device_type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device_type=cuda but no CUDA device is available")
    if device_type == "mps" and not torch.backends.mps.is_available():
        raise ValueError("device_type=mps but MPS is not available")

    torch.manual_seed(seed)
    if device_type == "cuda":
        torch.cuda.manual_seed(seed)
        torch.set_float32_matmul_precision("high")  # tf32 for the fp32 matmuls that remain

    ddp, rank, local_rank, world_size = get_dist_info()
    if ddp and device_type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl", device_id=device)
        dist.barrier()
    elif ddp:
        device = torch.device(device_type)
        dist.init_process_group(backend="gloo")
        dist.barrier()
    else:
        device = torch.device(device_type)
    print0(f"device {device} | world size {world_size}")
    return ddp, rank, local_rank, world_size, device


def compute_cleanup():
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


class DummyWandb:
    """Stands in for a wandb run when no run name is given (or off rank 0)."""

    def log(self, *args, **kwargs):
        pass

    def finish(self):
        pass


def get_wandb(run, project, config, rank=0):
    """A real wandb run when `run` names one (rank 0 only), a DummyWandb otherwise."""
    if not run or run == "dummy" or rank != 0:
        return DummyWandb()
    try:
        import wandb  # optional dependency: only needed when logging to wandb
    except ImportError:
        raise ImportError(f"--run={run} asks for wandb logging, but wandb is not installed (pip install wandb)")
    return wandb.init(project=project, name=run, config=config)


def autocast_context(device_type):
    """bf16 autocast on CUDA; CPU and MPS run in fp32."""
    if device_type == "cuda":
        return torch.amp.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


# -----------------------------------------------------------------------------
# Linear layers on CPU

def onednn_linear_available():
    """Whether this torch build has oneDNN's fused linear op (x86 builds do)."""
    if platform.machine().lower() not in ("x86_64", "amd64") or not torch.backends.mkldnn.is_available():
        return False
    try:
        return torch.ops.mkldnn._linear_pointwise.default is not None
    except (AttributeError, RuntimeError):
        return False


# torch runs fp32 F.linear on CPU through MKL, which on AMD CPUs takes its AVX2 path: half the AVX-512 speed that
# oneDNN (shipped with torch, used by its convolutions) reaches on the same cores. A switch so that the benchmark
# and the tests can compare both.
CPU_ONEDNN_LINEAR = onednn_linear_available()
# oneDNN builds a kernel for each new input shape (0.3-0.5 ms here). A wide layer earns that back at once; a narrow
# one never does when shapes keep changing (the tiny GPT re-reading a growing sequence ran 2.2x slower through it)
ONEDNN_MIN_WIDTH = 512  # both in_features and out_features: the real encoder's and d20's layers, none of tiny's


def linear(x, weight, bias=None):
    """F.linear, through oneDNN for wide fp32 layers on CPU when no gradient is needed: about twice MKL's speed on
    the SAM, CLIP and d20 shapes on an AVX-512 AMD CPU (scripts/bench_encoder times the encoder with and without),
    the same product to fp32 round-off. Anything else (autograd, autocast, CUDA, other dtypes, narrow layers) is
    plain F.linear."""
    if (CPU_ONEDNN_LINEAR and x.device.type == "cpu" and x.dtype == weight.dtype == torch.float32
            and min(weight.shape) >= ONEDNN_MIN_WIDTH and not torch.is_autocast_enabled("cpu")
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                                  or (bias is not None and bias.requires_grad)))):
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """nn.Linear (same parameters, same state dict, same LoRA and 4-bit handling) whose forward is `linear`."""

    def forward(self, x):
        return linear(x, self.weight, self.bias)


# The exact layer types whose weight and bias are the whole layer: what 4-bit quantization may replace and the
# GPT's fused q/k/v may concatenate (subclasses such as those inside nn.MultiheadAttention, 4-bit layers and
# adapters are not)
PLAIN_LINEARS = (nn.Linear, Linear)
