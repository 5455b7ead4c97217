"""Where a run computes: the device, distributed training under torchrun, the CPU's instruction sets
and the precision they make fast."""

import contextlib
import os
import platform
from dataclasses import dataclass

import torch

MIXED_PRECISION_SETTINGS = ("auto", "on", "off")


def get_device():
    """CUDA if available, else Apple MPS, else CPU; VIT_DEVICE (cpu, cuda, cuda:1, mps) chooses instead.
    The test session sets it to cpu, so the printed numbers nbval compares are the same on every machine."""
    requested = os.environ.get("VIT_DEVICE")
    if not requested:
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(requested)
    except RuntimeError:
        raise ValueError(f"VIT_DEVICE={requested!r} is not a device (use cpu, cuda, cuda:N or mps)") from None
    available = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    if not available.get(device.type, False):
        raise ValueError(f"VIT_DEVICE={requested!r}: {device.type} is not available on this machine")
    return device


def is_main_process():
    return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0


def all_gather(obj):
    """Every rank's `obj` as a list (a one-item list when not distributed)."""
    if not torch.distributed.is_initialized():
        return [obj]
    gathered = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, obj)
    return gathered


def _cpuinfo_field(*names):
    """The first /proc/cpuinfo line's value whose key is one of `names` ("" where there is none)."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            line = next((line for line in cpuinfo if line.split(":")[0].strip() in names), "")
    except OSError:
        return ""
    return line.partition(":")[2].strip()


def cpu_flags():
    """The CPU's instruction-set flags (from /proc/cpuinfo; empty where the system does not have it)."""
    return set(_cpuinfo_field("flags", "Features").split())


def cpu_model():
    """The CPU's model name, for the records of timed runs."""
    return _cpuinfo_field("model name", "Model name") or platform.processor() or platform.machine()


# x86 instructions that multiply bf16 numbers natively; without them a bf16 matmul is emulated and
# autocast makes training about ten times slower instead of two to three times faster.
CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


@dataclass(frozen=True)
class Precision:
    """The floating-point type the forward pass is autocast to (None: fp32), and why it was chosen."""

    dtype: torch.dtype | None
    reason: str

    def autocast(self, device):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(torch.device(device).type, dtype=self.dtype)

    def grad_scaler(self, device):
        """fp16 gradients underflow without loss scaling; bf16 has fp32's range and needs none."""
        return torch.amp.GradScaler(torch.device(device).type, enabled=self.dtype == torch.float16)

    def __str__(self):
        name = {None: "fp32", torch.bfloat16: "bf16 autocast", torch.float16: "fp16 autocast"}[self.dtype]
        return f"{name} ({self.reason})"


def choose_precision(device, setting="auto", flags=None, kernels=None):
    """The Precision for `device` under TrainingConfig.mixed_precision `setting`. "auto" reads the
    hardware, never a timing: on CUDA, bf16 where the GPU supports it, else fp16; on a CPU, bf16 only
    where the CPU has bf16 instructions (CPU_BF16_FLAGS) and PyTorch runs its AVX-512 kernels, else
    fp32; on MPS, fp32. The environment variable VIT_MIXED_PRECISION (auto, on, off) replaces "auto"
    (the test session sets off, so what the tests compare does not depend on the CPU). `flags` (the
    CPU's, cpu_flags()) and `kernels` (torch.backends.cpu.get_cpu_capability()) are for tests."""
    device = torch.device(device)
    source = "mixed_precision"
    if setting == "auto":
        source = "VIT_MIXED_PRECISION"
        setting = os.environ.get(source, "auto").strip().lower() or "auto"
    if setting not in MIXED_PRECISION_SETTINGS:
        raise ValueError(f"{source}={setting!r}: choose one of {MIXED_PRECISION_SETTINGS}")
    if setting == "off":
        return Precision(None, f"{source}=off")
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return Precision(torch.bfloat16, "the GPU supports bf16")
        return Precision(torch.float16, "the GPU has no bf16; fp16 with loss scaling")
    if device.type == "mps":
        return (
            Precision(torch.float16, f"{source}=on")
            if setting == "on"
            else Precision(None, "no measured gain from autocast on MPS")
        )
    flags = cpu_flags() if flags is None else set(flags)
    kernels = torch.backends.cpu.get_cpu_capability() if kernels is None else kernels
    native = sorted(flags.intersection(CPU_BF16_FLAGS))
    if setting == "on":
        return Precision(
            torch.bfloat16,
            f"{source}=on"
            + ("" if native else "; this CPU has no bf16 instructions, expect it to be slower"),
        )
    if not native:
        return Precision(None, f"the CPU has none of {', '.join(CPU_BF16_FLAGS)}")
    if not kernels.upper().startswith(("AVX512", "AMX")):
        return Precision(None, f"the CPU has {native[0]} but PyTorch runs its {kernels} kernels")
    return Precision(torch.bfloat16, f"the CPU has {native[0]}")


def init_distributed():
    """Join the process group when launched by torchrun; returns (rank, world_size)."""
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if world_size > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        torch.distributed.init_process_group(backend)
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    return rank, world_size
