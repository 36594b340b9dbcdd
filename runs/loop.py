"""
What a training loop needs besides the method: data-parallel ranks that agree, a throughput meter and log, and a
guard against non-finite steps. train.py's loop calls each in one line.
"""

import hashlib
import math
import os
import time

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from runs.files import append_jsonl, write_json
from runs.settings import get_device


def start_ranks(cfg):
    """(ddp, rank, world size, device): data-parallel ranks under torchrun (one process per GPU or CPU shard)."""
    device = get_device(cfg.device, auto=True)
    if int(os.environ.get("WORLD_SIZE", 1)) == 1:
        return False, 0, 1, device
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    return True, dist.get_rank(), dist.get_world_size(), device


class Meter:
    """Training throughput (target tokens/s over all ranks) and the train_log.jsonl records."""

    def __init__(self, world):
        self.world, self.tokens, self.since = world, 0, time.time()

    def log(self, bar, out_dir, cfg, step, lr, losses, tokens):
        """The progress bar every step; a train_log.jsonl record (the loss of each subnet) every log_interval."""
        self.tokens += tokens * self.world
        names = (["model"] if cfg.arch else ["L", "S"] + [f"R{k}" for k in range(cfg.n_random)]
                 if cfg.sampling == "sandwich" else ["R"])  # largest, smallest, random
        record = {"step": step, "lr": lr, **{n: round(v, 4) for n, v in zip(names, losses)}}
        bar.set_postfix(loss=f"{np.mean(losses):.3f}", lr=f"{lr:.1e}",
                        tok_s=f"{self.tokens / (time.time() - self.since):.0f}")
        bar.update(1)
        if step % cfg.log_interval == 0:
            record["tok_per_s"] = round(self.tokens / (time.time() - self.since))
            self.tokens, self.since = 0, time.time()
            append_jsonl(out_dir / "train_log.jsonl", record)


class Health:
    """Counts non-finite steps: each is skipped; max_bad in a row stop the run with the last checkpoint intact."""

    def __init__(self, max_bad):
        self.max_bad, self.in_a_row, self.skipped = max_bad, 0, 0

    def finite(self, losses, grad_norm, step) -> bool:
        """Whether this step's update may be applied."""
        if all(map(math.isfinite, losses)) and torch.isfinite(grad_norm):
            self.in_a_row = 0
            return True
        self.in_a_row, self.skipped = self.in_a_row + 1, self.skipped + 1
        tqdm.write(f"step {step}: non-finite loss {dict(enumerate(losses))} or gradient norm; update skipped "
                   f"({self.skipped} so far)")
        if self.in_a_row >= self.max_bad:
            raise SystemExit(f"error: {self.in_a_row} non-finite steps in a row at step {step}; stopping with the "
                             f"last checkpoint intact (try a lower --lr or --clip)")
        return False


def stop_now(stop: bool, ddp: bool) -> bool:
    """Whether to stop after this step; under data parallel, every rank stops at the same step."""
    flag = torch.tensor(int(stop))
    if ddp:
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag)


def average_gradients(model, world):
    """Data parallel: average the gradients over ranks (all ranks trained the same subnets on their own shard)."""
    for p in model.parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad /= world


def check_replicas(model, subnets, world, master, out_dir):
    """Data parallel: the replicas stayed in sync (same subnets every step, same weights at the end), or an error."""
    digest = [float(sum(p.data.double().sum() for p in model.parameters())),
              hashlib.sha256(str(subnets).encode()).hexdigest()]
    digests = [None] * world
    dist.all_gather_object(digests, digest)
    if master:
        write_json(out_dir / "ddp_check.json", {"rank_digests": digests, "in_sync": digests.count(digest) == world})
        if digests.count(digest) != world:
            raise SystemExit(f"error: data-parallel replicas diverged: {digests}")
