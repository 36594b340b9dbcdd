"""
The machine a figure was measured on, and its state: every latency and timing figure is recorded with them, and
bf16 is used only where the hardware runs it natively.
"""

import os
import platform
import time
from pathlib import Path

import torch

BUSY_LOAD = 0.5  # runnable processes beyond our own threads (1-minute load average) that make a figure suspect
BUSY_CORES = 0.5  # CPU time other processes took per second of a measurement (in cores) that makes a figure suspect
MIN_WINDOW = 1.0  # seconds: over a shorter measurement /proc/stat's 10 ms ticks say little; the load average decides


def machine() -> str:
    """The CPU (or GPU) every latency figure was measured on, in words: its name, its widest vector instructions and
    whether it runs bf16 natively (AVX-512 BF16, AMX), and its cores."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")),
                platform.processor() or platform.machine())
    simd = "AVX-512" if "avx512f" in info else "AVX2" if "avx2" in info else "no AVX2"
    bf16 = [words for flag, words in (("avx512_bf16", "AVX-512 BF16"), ("amx_bf16", "AMX")) if flag in info]
    return f"{name}, {simd}{' with ' + ' and '.join(bf16) if bf16 else ''}, {os.cpu_count()} cores"


def cpu_clock() -> tuple:
    """(busy CPU seconds of the whole machine since boot, or None without /proc/stat; CPU seconds of this process,
    every thread; a monotonic clock in seconds): two readings tell how much CPU other processes took in between."""
    stat = Path("/proc/stat")
    busy = None
    if stat.exists():
        ticks = [int(x) for x in stat.read_text().split("\n")[0].split()[1:]]  # user nice system idle iowait ...
        busy = (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")  # all but idle and iowait
    own = os.times()
    return busy, own.user + own.system, time.monotonic()


def machine_state(threads: int) -> dict:
    """The conditions of a latency measurement: the machine, the 1-minute load average, the cores, `others` (the
    load beyond the `threads` this measurement keeps busy itself: the average lags by about a minute), and the CPU
    readings (cpu_clock) from which busy_warning tells what other processes took while it ran."""
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    busy, own, clock = cpu_clock()
    return dict(machine=machine(), load_1min=round(load, 2), cores=os.cpu_count(),
                others=round(max(0.0, load - threads), 2), time=time.strftime("%Y-%m-%d %H:%M:%S"),
                busy_cpu_s=busy, own_cpu_s=own, clock_s=clock)


def busy_warning(before: dict, after: dict, threads: int):
    """A warning (text) if other work loaded the cores between two machine_state()s, else None: the CPU time other
    processes took in between, per second, where /proc/stat has it and the window is long enough; else the load
    average beyond our own threads (which still counts work that ended up to a minute before)."""
    window = after.get("clock_s", 0) - before.get("clock_s", 0)
    if before.get("busy_cpu_s") is not None and after.get("busy_cpu_s") is not None and window >= MIN_WINDOW:
        others = (after["busy_cpu_s"] - before["busy_cpu_s"] - (after["own_cpu_s"] - before["own_cpu_s"])) / window
        if others > BUSY_CORES:
            return (f"other processes took {others:.1f} cores while it ran ({window:.0f} s, {threads} threads of "
                    f"ours): trust ratios to a reference measured alongside more than the ms")
        return None
    if max(before["others"], after["others"]) > BUSY_LOAD:
        return (f"other work loads the cores (load {before['load_1min']} before, {after['load_1min']} after, "
                f"{threads} threads of ours): trust ratios to a reference measured alongside more than the ms")
    return None


def synchronizer(device):
    """A function that waits for every kernel queued on `device` (a CUDA GPU runs them asynchronously: a clock read
    before that measures the launches only); on a CPU, nothing to wait for."""
    device = torch.device(device)
    return (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)


def deterministic_kernels(on: bool):
    """Deterministic kernels only (torch.use_deterministic_algorithms), or not: on a GPU a resumed run then repeats
    the uninterrupted one bitwise (cuBLAS needs its workspace setting for that), at some speed."""
    if torch.are_deterministic_algorithms_enabled() != on:  # setting it imports the compiler stack: 1-2 s a process
        torch.use_deterministic_algorithms(on)
    if on:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def fast_bf16(device) -> bool:
    """Whether bf16 autocast runs natively on `device`: a CUDA GPU with bf16 in hardware (emulation, as on a V100 or
    T4, does not count), or an x86 CPU with AVX-512 bf16 or AMX instructions. Elsewhere bf16 is emulated and slower
    than fp32, so fp32 is kept. Read when a run starts."""
    if torch.device(device).type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    cpuinfo = Path("/proc/cpuinfo")
    flags = cpuinfo.read_text() if cpuinfo.exists() else ""
    return "avx512_bf16" in flags or "amx_bf16" in flags
