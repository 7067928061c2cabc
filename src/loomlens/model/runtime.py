"""The machine a model runs on: the one device rule of every command (`resolve_device`), how
the process hands memory to torch on a CPU, whether the CPU computes bf16 natively, and where
choices measured on this machine are kept between processes (`cache_dir`, `machine_signature`).

glibc's malloc serves each large tensor (above its mmap threshold, or from a heap top it
trims) with fresh pages from the kernel, and every page faults on first touch. A training
step of the tiny model allocates and frees tens of megabytes of activations that way, so it
page-faults thousands of times (a batch of answers, too); keeping freed memory in the heap
for reuse removes most of them and makes the step faster (`python -m bench.page_faults`
counts them; figures in docs/training.md). The cost: the process keeps its peak memory until
it exits.
"""

from __future__ import annotations

import ctypes
import os
import platform
import sys
from pathlib import Path

__all__ = ["cache_dir", "cpu_has_bf16", "keep_freed_memory", "machine_signature", "resolve_device"]

#: mallopt parameters (glibc's malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
#: glibc's upper limit for the mmap threshold on 64-bit (DEFAULT_MMAP_THRESHOLD_MAX).
_MMAP_MAX = 32 << 20
#: Free memory at the heap's top is given back to the kernel only beyond this.
_TRIM = 1 << 30


def keep_freed_memory() -> bool:
    """Make glibc keep freed memory for reuse: blocks up to 32 MiB come from the heap, and
    the heap is trimmed only past 1 GiB free. Returns False (and changes nothing) where the C
    library is not glibc (macOS, Windows, musl)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_MAX)) and bool(mallopt(_M_TRIM_THRESHOLD, _TRIM))


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX tiles); elsewhere torch
    emulates bf16 and it is slower than fp32."""
    import torch

    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # private torch API: probe
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


def cache_dir() -> Path:
    """The folder for what loomlens measures once per machine: `$LOOMLENS_CACHE_DIR`, else
    `$XDG_CACHE_HOME/loomlens`, else `~/.cache/loomlens`. Not created here."""
    if os.environ.get("LOOMLENS_CACHE_DIR"):
        return Path(os.environ["LOOMLENS_CACHE_DIR"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "loomlens"


def _cpu_name() -> str:
    """The CPU's model name (Linux's /proc/cpuinfo), else what `platform` says."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_signature() -> str:
    """What a kernel choice measured on this machine is kept under: the CPU model and torch's
    version (a home folder shared between machines, or an upgraded torch, time anew). Not the
    thread count: a batch's halves run on fewer threads than a lone image (`infer/streams.py`),
    and an image must meet the same kernels, so the same answer, either way."""
    import torch

    return f"{_cpu_name()} | torch {torch.__version__}"


def resolve_device(name: str = "auto"):
    """The one device rule of every command: `auto` -> CUDA when available, else the CPU;
    other names (`check_device_name`) as torch spells them. Returns a `torch.device`; raises
    ValueError for an unknown name or a device type this torch does not have."""
    import torch

    from loomlens.config import check_device_name

    if check_device_name(name) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    present = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    if not present[device.type]:
        raise ValueError(f"device {name} was asked for, but this torch sees none: use --device auto or cpu")
    return device
