"""
What a training loop needs besides the method: the settings of a run that may resume, data-parallel ranks that
agree, a throughput meter and log, and a guard against non-finite steps. train.py's loop calls each in one line.
"""

import hashlib
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from runs.checkpoints import check_same, check_vocab
from runs.files import append_jsonl, lock_folder, write_json
from runs.folders import check_target
from runs.machine import fast_bf16
from runs.settings import NAMED_ARCHS, check_settings, get_device


def settings_of_run(cfg, passed: dict, master: bool, device, checks: tuple, runtime: tuple, reads: list, load):
    """(settings, checkpoint to resume or None), checked with checks = (BOUNDS, CHOICES) and the rules between
    settings, and the output folder with them (runs/folders.py), before anything is written. With --resume the
    checkpoint's stored settings win: the command line (`passed`) may change only the `runtime` ones, how long and
    how often, never what is trained. load(path) reads the checkpoint (train.load_checkpoint). bf16=None is decided
    later (faster_precision)."""
    check_settings(cfg, *checks)
    evaluates = cfg.eval_only or cfg.translate  # scores or translates --init; trains nothing, writes no out_dir
    if evaluates and not cfg.init:
        raise SystemExit("error: --eval_only/--translate need --init=CHECKPOINT")
    if cfg.init and not cfg.arch and not evaluates:  # --init alone would train from scratch
        raise SystemExit(f"error: --init={cfg.init} without --arch: finetuning extracts the subnet --arch from that "
                         f"supernet; give --arch=FILE|largest|smallest|middle (a run continues with --resume=True)")
    ckpt_path = Path(cfg.out_dir) / "ckpt.pt"
    if cfg.resume and cfg.overwrite:
        raise SystemExit("error: --resume=True continues the run in out_dir, --overwrite=True deletes it; pass one")
    if not evaluates:  # a run writes out_dir: never an impossible target or an input
        check_target(cfg.out_dir, "--out_dir", reads=reads)
    if master and cfg.resume:  # one writer per run folder, taken before reading the checkpoint it continues
        lock_folder(cfg.out_dir, create=False)
    resumed = load(ckpt_path) if cfg.resume else None
    if resumed:
        check_same(resumed["config"], cfg, [k for k in passed if k not in runtime], ckpt_path)
        cfg = type(cfg)(**{**resumed["config"], **{k: getattr(cfg, k) for k in passed if k in runtime},
                           "resume": True, "overwrite": False})  # a run started with --overwrite is kept now
        check_settings(cfg, *checks)
        if cfg.max_steps < resumed["step"]:
            raise SystemExit(f"error: --max_steps={cfg.max_steps} is below the step of checkpoint {ckpt_path} "
                             f"({resumed['step']}); give --max_steps={resumed['step']} or more")
    if cfg.router == "none" and cfg.num_experts != 1 and not evaluates:  # (an evaluation takes --init's)
        raise SystemExit("error: --router=none is plain weight sharing with one expert: add --num_experts=1")
    if cfg.bf16 and not fast_bf16(device):
        print("warning: --bf16=True where bf16 is not native (a CPU without AVX-512 BF16/AMX, or such a GPU): emulated "
              "bf16 can be ~100x slower than fp32 here; --bf16=False is faster", file=sys.stderr)
    return cfg, resumed


def run_inputs(cfg, data_root) -> list:
    """The files and folders a train.py run reads (its output folder may not hold or lie in any of them): the
    supernet to finetune, the arch file, the text to translate, the prepared corpus (default data_root/<data>) and
    its source."""
    files = [cfg.init, cfg.arch if cfg.arch not in NAMED_ARCHS else "", cfg.translate if cfg.translate != "-" else "",
             cfg.data_source if "://" not in cfg.data_source else ""]
    return files + ([cfg.data_dir or Path(data_root) / cfg.data] if cfg.data != "toy" else [])


def banner(model, cfg, what: str, device, world: int, resumed_step) -> str:
    """One line on what a run trains (`what`), its size, data and machine, and where it starts."""
    return (f"{what} | {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters | {cfg.data} | device "
            f"{device} x{world} | {torch.get_num_threads()} threads | "
            + (f"resuming at step {resumed_step}" if resumed_step is not None else f"from {cfg.init or 'scratch'}"))


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


def faster_precision(step, model, device, ddp: bool, say=False):
    """--bf16 unset: (bf16?, why), timing step(bf16), one training step of the largest subnet, in fp32 and in bf16
    autocast, interleaved, after a warm-up of each (seconds). Emulated bf16 (~100x slower than fp32) is not timed.
    Weights, gradients and the random state are left as they were; every data-parallel rank takes rank 0's answer.
    say: also print the answer and why."""
    if not fast_bf16(device):
        answer, why = [False], "fp32: this device has no native bf16 (no AVX-512 BF16/AMX, or a GPU without bf16)"
    else:
        seconds = {False: [], True: []}
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            for bf16 in (False, True) * 3:  # the first round warms up
                t = time.perf_counter()
                step(bf16)  # (its loss's .item() waits for a GPU)
                seconds[bf16].append(time.perf_counter() - t)
                model.zero_grad(set_to_none=True)
        fp32, bf16 = min(seconds[False][1:]), min(seconds[True][1:])
        answer = [bf16 < fp32]
        if ddp:
            dist.broadcast_object_list(answer, src=0)
        why = (f"{'bf16 autocast' if answer[0] else 'fp32'}, the faster here: a step of the largest subnet took "
               f"{fp32:.2f} s in fp32, {bf16:.2f} s in bf16 (--bf16=True/False forces one)")
    if say:
        print(f"precision {why}")
    return answer[0], why


def score_line(r: dict) -> str:
    """One evaluation result (train.evaluate's dict) as a line of text."""
    return (f"loss {r['loss']:.3f} | BLEU {r['bleu']:.2f} | {r['bleu_signature']}"
            + (f" | compound-split BLEU (HAT's tables) {r['bleu_compound_split']:.2f}" if "bleu_compound_split" in r
               else ""))


def valid_line(record: dict) -> str:
    """A validation record (step, and per model or subnet a dict with its loss and maybe BLEU) as a line of text."""
    return f"step {record['step']} valid | " + " | ".join(
        f"{n} loss {r['loss']:.3f}" + (f" bleu {r['bleu']:.2f}" if "bleu" in r else "")
        for n, r in record.items() if isinstance(r, dict))


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


def stop_now(stop: bool, ddp: bool, device) -> bool:
    """Whether to stop after this step; under data parallel, every rank stops at the same step. The flag lives on
    the run's device: NCCL serves CUDA tensors only."""
    flag = torch.tensor(int(stop), device=device)
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


def corpus_hash(corpus) -> str:
    """sha256 of the training sentences (their lengths and ids, both sides): a resumed run must see the same data."""
    digest = hashlib.sha256()
    for side in corpus.splits["train"]:
        digest.update(np.array([len(x) for x in side]).tobytes() + np.concatenate(side).astype(np.int64).tobytes())
    return digest.hexdigest()


def check_data(corpus, max_tokens: int, max_len: int, resumed, path) -> dict:
    """The limits a run meets, checked before it writes anything: a resumed run (its checkpoint at `path`)
    continues on the corpus it trained on (vocabularies, and sentences: corpus_hash), every sentence fits the model's
    position table, every training sentence a batch of max_tokens. Returns the data's identity, for checkpoints."""
    data_hash = corpus_hash(corpus)
    if resumed:
        check_vocab(resumed, corpus, path)
        if resumed.get("data_hash", data_hash) != data_hash:  # (checkpoints from before the hash have none)
            raise SystemExit(f"error: checkpoint {path} was trained on other sentences than data {corpus.name!r} "
                             f"holds now (prepared again?); pass the --data_dir it was trained on, or --overwrite=True")
    for split, sides in corpus.splits.items():
        for side, seqs in zip(("source", "target"), sides):
            n, i = max((len(x), i) for i, x in enumerate(seqs)) if seqs else (0, 0)
            if n + 1 > max_len:  # + 1: the target's BOS
                raise SystemExit(f"error: {split} {side} sentence {i} has {n} tokens; the model has {max_len} "
                                 f"positions: filter it out of the corpus (data/prepare.py) or shorten it")
            if split == "train" and n > max_tokens:
                raise SystemExit(f"error: --max_tokens={max_tokens} is below the longest training sentence "
                                 f"({n} tokens, {side} sentence {i}); raise --max_tokens")
    return dict(vocab=dict(src=corpus.src_vocab.itos, tgt=corpus.tgt_vocab.itos), data_hash=data_hash)
