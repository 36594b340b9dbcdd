"""What a GPU run relies on, checked on a CPU (issue 44): collectives on the run's device, synchronisation of the
device a figure is timed on, the bf16 decision on the chosen device with emulation not counted, and deterministic
kernels on request. Run: python -m pytest -q tests/test_devices.py (seconds)"""

import os
import subprocess
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import train
from runs import loop, machine


def test_a_backend_bound_to_cuda_refuses_a_cpu_flag_and_the_stop_flag_lives_on_the_runs_device(tmp_path, monkeypatch):
    """Under NCCL (emulated: gloo bound to cuda only) a CPU tensor has no backend: the stop flag the training loop
    all-reduces every step must be made on the run's device, and is."""
    dist.init_process_group("cuda:gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        with pytest.raises(RuntimeError, match="No backend type associated with device type cpu"):
            dist.all_reduce(torch.tensor(1))  # what stop_now did before: every multi-GPU run stopped at step 1
    finally:
        dist.destroy_process_group()
    made, reduced, real = [], [], torch.tensor
    monkeypatch.setattr(loop.torch, "tensor", lambda value, device=None: made.append(device) or real(value))
    monkeypatch.setattr(loop.dist, "all_reduce", lambda flag, op=None: reduced.append(flag))
    assert loop.stop_now(True, True, torch.device("cuda", 1)) is True and loop.stop_now(False, True, "cpu") is False
    assert made == [torch.device("cuda", 1), "cpu"] and len(reduced) == 2


def test_timing_waits_for_the_device_it_times(monkeypatch):
    waited = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: waited.append(device))
    machine.synchronizer("cuda:1")()
    machine.synchronizer(torch.device("cpu"))()  # nothing queued on a CPU: no call
    assert waited == [torch.device("cuda", 1)]


def test_the_bf16_choice_reads_the_chosen_device_and_not_emulation(monkeypatch):
    asked = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU present ...
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: asked.append(
        including_emulation) or including_emulation)  # ... that emulates bf16 (a V100, a T4)
    assert machine.fast_bf16("cuda") is False and asked == [False]
    cpu_flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    assert machine.fast_bf16("cpu") == ("avx512_bf16" in cpu_flags or "amx_bf16" in cpu_flags) and asked == [False]


def test_deterministic_kernels_on_request_and_off_again(tmp_path):
    toy = ["--preset=toy", "--max_steps=2", "--bleu_sentences=-1", "--test_sentences=2"]
    try:
        train.main([*toy, "--deterministic=True", f"--out_dir={tmp_path / 'a'}"])
        assert torch.are_deterministic_algorithms_enabled()
        train.main([*toy, f"--out_dir={tmp_path / 'b'}"])  # the next run's own choice, not the last run's
        assert not torch.are_deterministic_algorithms_enabled()
    finally:
        torch.use_deterministic_algorithms(False)


def test_the_gpu_check_parses_uses_every_gpu_and_times_both_protocols(tmp_path):
    """tests/gpu_check.sh is the one script a lent GPU runs: it must parse, start torchrun with one rank per GPU,
    label the latency of each protocol, and stop at once in one line where there is no GPU."""
    script = Path(__file__).resolve().parent / "gpu_check.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    text = script.read_text()
    assert "torch.cuda.device_count()" in text and '--nproc_per_node="$(( GPUS > 0 ? GPUS : 1 ))"' in text
    assert "for protocol in hat beam" in text and "--protocol=$protocol" in text
    if not torch.cuda.is_available():
        r = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=120,
                           env={**os.environ, "OUT": str(tmp_path / "gpu")})
        assert r.returncode == 2 and "error: no CUDA device visible to torch" in r.stdout + r.stderr
