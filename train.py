"""
Train a Mixture-of-Supernets supernet, a standalone subnet, or finetune an extracted subnet; evaluate with BLEU.

    python train.py                                        # neuron-wise MoS supernet, Multi30k, CPU preset
    python train.py --router=none --num_experts=1 --sampling=random   # HAT's weight-sharing supernet
    python train.py --arch=best.json                       # a standalone subnet from scratch (the baseline)
    python train.py --arch=best.json --init=out/ckpt.pt    # finetune the subnet extracted from a supernet
    python train.py --eval_only=True --init=out/ckpt.pt --arch=largest    # test BLEU of one (sub)net
    echo "ein hund läuft ." | python train.py --translate=- --init=out/ckpt.pt --arch=largest
    torchrun --nproc_per_node=2 train.py ...               # data-parallel, one shard per rank

Read after mos.py, top to bottom: the settings; the training algorithm (`subnets_for` and `train_step`: the
sandwich rule); the loop in `main`; the model it trains; evaluation (loss, beam search, BLEU); last, how a checkpoint
becomes a model. The run machinery (settings parsing, run folders, checkpoint files, signals, ranks) is runs/, called
in a line each; latency.py and search.py load checkpoints from here, and search.py's fitness is `valid_loss`.
"""

import math
import random
import re
import shlex
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from sacrebleu.metrics import BLEU
from tqdm import tqdm

import mos
from data.batching import TokenBatcher, collate, split_batches
from data.corpus import remove_bpe
from data.prepare import DATA_DIR, load_data
from mos import EOS, PAD, SPACES, ArchConfig, build
from runs import checkpoints
from runs.checkpoints import (KINDS, average_snapshots, check_input, is_snapshot_step, restore_run, save_checkpoint,
                              save_run)
from runs.files import append_jsonl, read_lines, releases_locks, write_json, write_lines
from runs.folders import open_train_folder
from runs.loop import (Health, Meter, average_gradients, banner, check_data, check_replicas, faster_precision,
                       run_inputs, score_line, settings_of_run, start_ranks, stop_now, valid_line)
from runs.machine import deterministic_kernels, fast_bf16, machine
from runs.settings import NAMED_ARCHS, parse_settings, read_arch
from runs.signals import StopRequests, run, stops_end_quietly

# -----------------------------------------------------------------------------
# Settings


@dataclass
class TrainConfig:
    """Every run setting. Defaults are the Multi30k CPU preset: bare `python train.py` runs it."""
    preset: str = "multi30k"  # multi30k | iwslt14 | toy: a named set of the values below (PRESETS)
    # data
    data: str = "multi30k"  # multi30k | iwslt14 | toy
    data_dir: str = ""  # prepared corpus; default data/<data>
    data_source: str = ""  # where data/prepare.py reads the corpus if it is not prepared yet (folder/URL/tarball)
    max_tokens: int = 4096  # tokens per batch (batch size * longest side, padding included)
    # model
    space: str = "cpu"  # search space in mos.SPACES: cpu | cpu_wide | iwslt14 | tiny
    router: str = "neuron"  # none (HAT weight sharing) | layer | neuron (MoS)
    num_experts: int = 2  # m in the paper; 1 with router=none
    router_hidden: int = 128  # the router MLP's hidden width
    dropout: float = 0.3  # scaled with width per subnet (HAT)
    # what to train: a supernet (arch empty), or one subnet (arch = JSON file | largest | smallest | middle)
    arch: str = ""  # empty: a supernet; else the one subnet to train, a JSON file | largest | smallest | middle
    init: str = ""  # supernet checkpoint to extract `arch` from (finetune); with eval_only/translate: the model
    sampling: str = "sandwich"  # sandwich: largest + smallest + n_random random per step (MoS) | random: one (HAT)
    n_random: int = 1  # random subnets per sandwich step, besides the largest and the smallest
    distill: bool = False  # in-place distillation: the largest subnet's distribution teaches the others
    # optimisation
    max_steps: int = 1500
    lr: float = 1e-3
    warmup: int = 500  # linear warm-up from warmup_init_lr, then inverse square root
    warmup_init_lr: float = 1e-7
    weight_decay: float = 1e-4
    label_smoothing: float = 0.1
    clip: float = 25.0  # gradient-norm clip (fairseq default); 0 = off
    bf16: bool | None = None  # bfloat16 autocast for forward passes; None: the faster here, timed at the start
    # evaluation and output
    out_dir: str = "out"
    eval_interval: int = 500  # steps between validations (each also writes ckpt.pt)
    save_interval: int = 100  # also write ckpt.pt every this many steps, so a kill costs little (0 = off)
    log_interval: int = 50
    bleu_sentences: int = 0  # validation BLEU on the first N valid sentences; 0 = all; -1: no BLEU, and no validation
    # before the last step (that one's loss only)
    beam: int = 5
    lenpen: float = 1.0
    test_sentences: int = 0  # final test BLEU on the first N sentences of `split`; 0 = all
    avg_last: int = 0  # average K weight snapshots from the end of training before the final test (0 = off)
    avg_interval: int = 0  # steps between those snapshots, the last at max_steps; 0 = one epoch (HAT: last 10 epochs)
    eval_only: bool = False  # score --init (with --arch for a supernet) on `split` and exit
    translate: str = ""  # translate lines from this file ('-' = stdin) with --init and exit
    split: str = "test"
    # system
    device: str = "auto"  # auto (cuda if present) | cpu | cuda
    seed: int = 1337
    deterministic: bool = False  # deterministic kernels (slower): a GPU run resumes bitwise, as a CPU run always does
    resume: bool = False  # continue out_dir/ckpt.pt exactly where it stopped
    overwrite: bool = False  # start over in an out_dir that holds a run, deleting that run's files first
    max_minutes: float = 55.0  # stop (and save) after this much training time, so the default run ends within the
    # hour even on a slower or busy machine; 0 = no limit
    max_bad_steps: int = 10  # stop after this many non-finite losses in a row (each such step is skipped)


PRESETS = {  # each lists only what differs from TrainConfig's defaults
    # 2-core CPU, about 50 minutes (README): the scaled-down space on Multi30k; TrainConfig's defaults
    "multi30k": dict(),
    # HAT's IWSLT14 De-En recipe (HAT, section 4): one GPU, 4096 tokens, 40K updates (MoS), lr 5e-4, 10K warm-up
    "iwslt14": dict(data="iwslt14", space="iwslt14", lr=5e-4, warmup=10000, max_steps=40000, dropout=0.375, bf16=False,
                    eval_interval=4000, save_interval=2000, bleu_sentences=1000, avg_last=10, max_minutes=0.0),
    # the synthetic reversal task: no files, seconds on a CPU (tests, demos)
    "toy": dict(data="toy", space="tiny", max_tokens=1024, lr=2e-3, warmup=100, max_steps=300, dropout=0.1,
                eval_interval=100, log_interval=20, bleu_sentences=100, router_hidden=32, max_minutes=0.0, bf16=False),
}
# the settings' checks (runs.settings.check_settings): every number finite and >= 0 unless named here with its own
# minimum or interval ...
BOUNDS = dict(max_tokens=1, num_experts=1, router_hidden=1, eval_interval=1, log_interval=1, beam=1, max_bad_steps=1,
              bleu_sentences=-1, dropout="[0, 1)", label_smoothing="[0, 1)", lr="(0, inf)",
              seed=(0, 2**32 - 1))
# ... and every named one is one of its choices
CHOICES = dict(preset=PRESETS, data=("multi30k", "iwslt14", "toy"), space=SPACES, router=("none", "layer", "neuron"),
               sampling=("sandwich", "random"), split=("train", "valid", "test"))
# what a resumed run may change on the command line: how long it runs and how often it reports, never what it trains
RUNTIME_SETTINGS = ("resume", "max_steps", "max_minutes", "out_dir", "device", "eval_interval", "save_interval",
                    "log_interval", "bleu_sentences", "test_sentences", "max_bad_steps")
MODEL_SETTINGS = ("space", "router", "num_experts", "router_hidden")  # what a supernet checkpoint fixes


# -----------------------------------------------------------------------------
# The training algorithm: which subnets a step trains, and one step of the sandwich rule


def subnets_for(step: int, cfg: TrainConfig, space, fixed_arch=None) -> list:
    """This step's subnets: the sandwich rule's largest, smallest and n_random random ones (MoS, section 3.3), or one
    random subnet (HAT), or [None] for a plain model. Seeded by the step alone, so every rank (and a resumed run)
    samples the same."""
    if fixed_arch is not None:
        return [None]
    rng = random.Random(cfg.seed * 1_000_003 + step)
    if cfg.sampling == "random":
        return [space.sample(rng)]
    return [space.largest(), space.smallest()] + [space.sample(rng) for _ in range(cfg.n_random)]


def train_step(model, batch, archs, cfg: TrainConfig) -> list:
    """Forward and backward every subnet of `archs` on the same batch. Their gradients add up in the shared weights
    (the mean over subnets, as MoS normalises by all passes' tokens); the caller then makes one optimizer update.
    With cfg.distill the first (largest) subnet's distribution is the others' target. Returns each subnet's loss."""
    src, tgt_in, tgt_out = batch  # (B, S), (B, T), (B, T)
    ntok = (tgt_out != PAD).sum()
    losses, teacher = [], None
    for i, arch in enumerate(archs):
        with torch.autocast(src.device.type, torch.bfloat16, enabled=cfg.bf16):
            logits = model(src, tgt_in) if arch is None else model(src, tgt_in, arch)  # (B, T, V)
        soft = teacher if (cfg.distill and i > 0) else None
        loss = token_loss(logits, tgt_out, cfg.label_smoothing, soft) / ntok
        (loss / len(archs)).backward()
        if cfg.distill and i == 0:
            teacher = logits.detach().float().softmax(-1)  # (B, T, V)
        losses.append(loss.item())
    return losses


class SmoothedCrossEntropy(torch.autograd.Function):
    """Summed label-smoothed cross-entropy of logits z (N, V) against targets y (N,), pad rows left out, with its
    gradient written out: d loss / d z = softmax(z) - q, q = (1 - eps) * onehot(y) + eps / V. The plain version is
    F.cross_entropy(logits, target, ignore_index=PAD, label_smoothing=eps, reduction="sum"); this one's backward
    reuses the forward's one (N, V) buffer in place, faster on a CPU (tests/test_speed.py checks value and gradient)."""

    @staticmethod
    def forward(ctx, logits, target, eps):
        logp = logits.log_softmax(-1, dtype=torch.promote_types(logits.dtype, torch.float32))  # (N, V), bf16 -> fp32
        real = (target != PAD).to(logp.dtype)  # (N,)
        nll, smooth = -logp.gather(1, target[:, None])[:, 0], -logp.mean(-1)  # (N,) each
        ctx.save_for_backward(logp, target, real)
        ctx.eps, ctx.dtype = eps, logits.dtype
        return (((1 - eps) * nll + eps * smooth) * real).sum()

    @staticmethod
    def backward(ctx, grad):
        logp, target, real = ctx.saved_tensors
        g = logp.exp_()  # softmax(z), in the saved buffer (backward runs once)
        g -= ctx.eps / g.size(1)
        g[torch.arange(g.size(0), device=g.device), target] -= 1 - ctx.eps
        g *= real[:, None] * grad  # pad rows get no gradient
        return g.to(ctx.dtype), None, None


def token_loss(logits, tgt_out, label_smoothing, soft_targets=None):
    """Summed label-smoothed cross-entropy over the non-pad target tokens (nats); with soft_targets (B, T, V),
    the cross-entropy against that distribution instead (in-place distillation)."""
    if soft_targets is None:
        return SmoothedCrossEntropy.apply(logits.flatten(0, 1), tgt_out.flatten(), label_smoothing)  # (B*T, V)
    logits = logits.float().flatten(0, 1)  # (B, T, V) -> (B*T, V)
    mask = tgt_out.flatten() != PAD
    return -(soft_targets.flatten(0, 1)[mask] * logits[mask].log_softmax(-1)).sum()


def make_optimizer(model, cfg: TrainConfig):
    """fairseq's Adam as HAT and MoS train with it: betas (0.9, 0.98), eps 1e-8 and *decoupled* weight decay,
    p -= lr * wd * p (AdamW), applied beside the Adam step. Coupled L2 decay (torch Adam's weight_decay) would be
    normalised by Adam like a gradient and wipe, at about lr per step, the weights that get no gradient: rare
    embedding rows and the outer supernet slices that small subnets never use."""
    return torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.98), eps=1e-8,
                             weight_decay=cfg.weight_decay)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """fairseq's inverse_sqrt: linear warm-up from warmup_init_lr to lr, then lr * sqrt(warmup / step)."""
    if step < cfg.warmup:
        return cfg.warmup_init_lr + (cfg.lr - cfg.warmup_init_lr) * step / cfg.warmup
    return cfg.lr * math.sqrt(cfg.warmup / max(step, 1))


# -----------------------------------------------------------------------------
# The run


@releases_locks
def main(argv):
    """Set up (settings, data, model, optimizer, run folder), train max_steps steps, then test."""
    cfg = parse_settings(TrainConfig, argv, presets=PRESETS)
    passed = dict(arg[2:].split("=", 1) for arg in argv)  # the settings given on the command line
    ddp, rank, world, device = start_ranks(cfg)
    master = rank == 0
    cfg, resumed = settings_of_run(cfg, passed, master, device, (BOUNDS, CHOICES), RUNTIME_SETTINGS,
                                   run_inputs(cfg, DATA_DIR), load=lambda path: load_checkpoint(path, resume=True))
    corpus = load_data(cfg.data, cfg.data_dir, cfg.data_source, cfg.seed)
    if cfg.eval_only or cfg.translate:
        return evaluate_or_translate(cfg, corpus, device, passed)
    deterministic_kernels(cfg.deterministic)  # this run's choice (an earlier in-process run's is reset)
    model, kind, model_args, space, fixed_arch = build_model(cfg, corpus, passed, resumed)
    out_dir = Path(cfg.out_dir)
    data_id = check_data(corpus, cfg.max_tokens, model.max_len, resumed, out_dir / "ckpt.pt")  # vocabularies, hash
    model.to(device)
    optimizer = make_optimizer(model, cfg)
    step, epoch, batch_in_epoch, seconds_before = restore_run(resumed, model, optimizer)  # where training stands
    src, tgt = corpus.splits["train"]
    batcher = TokenBatcher([len(s) for s in src], [len(t) for t in tgt], cfg.max_tokens, seed=cfg.seed,
                           rank=rank, world_size=world)
    if cfg.bf16 is None:  # unset: the faster precision here, timed on a step of the largest subnet, first batch
        first = [x.to(device) for x in collate(src, tgt, batcher.batches(epoch)[0])]
        largest = [space.largest() if fixed_arch is None else None]  # (a standalone model takes no arch)
        one_step = lambda bf16: train_step(model, first, largest, replace(cfg, bf16=bf16))
        cfg = replace(cfg, bf16=faster_precision(one_step, model, device, ddp, say=master)[0])
    if master:  # the run folder (runs/folders.py), then one line on what trains
        open_train_folder(out_dir, asdict(cfg), step if resumed else None, run_inputs(cfg, DATA_DIR), cfg.overwrite)
        what = f"{kind} ({cfg.router} x{cfg.num_experts} experts)" if kind == "supernet" else f"standalone {fixed_arch}"
        print(banner(model, cfg, what, device, world, step if resumed else None))
    avg_interval = cfg.avg_interval or len(batcher.batches(0))  # default: one epoch of this rank's batches
    t0 = time.time()
    train_seconds = lambda: seconds_before + time.time() - t0  # training time over all sessions of this run

    def save():
        """The whole state of the run as it stands, to resume exactly (runs/checkpoints.py)."""
        save_run(out_dir / "ckpt.pt", model, optimizer, step, kind=kind, model_args=model_args, config=asdict(cfg),
                 data=dict(epoch=epoch, batch=batch_in_epoch), **data_id, train_seconds=train_seconds())

    def validate():
        """Valid loss (and BLEU) of the representative subnets, logged."""
        validate_and_log(model, kind, space, corpus, cfg, device, out_dir, step, epoch, round(train_seconds(), 1))

    # ---- the training loop. One step of the method: take the next batch and set the learning rate from the schedule;
    # train_step runs each of this step's subnets (the sandwich rule: the largest, the smallest and random ones)
    # forward and backward on that batch, their gradients adding up in the shared weights; the gradient norm is
    # clipped; one AdamW update changes every weight the step used, experts and routers included. Everything else in
    # the loop is machinery, one call each: logging, snapshots, validation, checkpoints, stopping.
    model.train()
    batches, meter, health = batcher.batches(epoch), Meter(world), Health(cfg.max_bad_steps)
    bar, stopped = tqdm(total=cfg.max_steps, initial=step, disable=not master or None, dynamic_ncols=True), False
    with StopRequests() as stop:  # Ctrl-C and SIGTERM (schedulers) stop the run after a step, saved
        while step < cfg.max_steps and not stopped:
            if batch_in_epoch >= len(batches):
                epoch, batch_in_epoch, batches = epoch + 1, 0, batcher.batches(epoch + 1)
            batch = [x.to(device) for x in collate(src, tgt, batches[batch_in_epoch])]  # src, tgt_in, tgt_out
            batch_in_epoch += 1
            lr = lr_at(step, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            torch.manual_seed(cfg.seed * 1_000_003 + step * world + rank)  # dropout: reproducible per step and rank
            losses = train_step(model, batch, subnets_for(step, cfg, space, fixed_arch), cfg)  # the sandwich rule
            if ddp:
                average_gradients(model, world)
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip if cfg.clip > 0 else math.inf)
            if health.finite(losses, grad_norm, step):  # a non-finite step is skipped (too many in a row stop)
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            if master:
                meter.log(bar, out_dir, cfg, step, lr, losses, tokens=int((batch[2] != PAD).sum()))
            if master and is_snapshot_step(step, cfg, avg_interval):  # weights only, for the final average
                save_checkpoint(dict(kind="snapshot", model=model.state_dict(), step=step),
                                out_dir / f"ckpt_step{step}.pt")
            due = step % cfg.eval_interval == 0 or step == cfg.max_steps
            out_of_time = cfg.max_minutes > 0 and train_seconds() / 60 > cfg.max_minutes
            stopped = stop_now(out_of_time or (stop.asked is not None and not due), ddp, device)  # a validation first
            if master and (stopped or due):  # validate (on a time-out too), then save
                if (cfg.bleu_sentences >= 0 and (due or out_of_time)) or (step == cfg.max_steps and not stopped):
                    validate()
                save()
            elif master and cfg.save_interval > 0 and step % cfg.save_interval == 0:
                save()  # so that a kill costs little
    bar.close()
    if stopped and master:
        tqdm.write(f"stopped at step {step} ({stop.asked or 'max_minutes reached'}); checkpoint saved, continue "
                   f"with --resume=True --out_dir={shlex.quote(cfg.out_dir)}")
    if stopped and stop.asked:
        return
    if ddp:
        check_replicas(model, [subnets_for(k, cfg, space, fixed_arch) for k in range(step)], world, master, out_dir)
    if master:
        with stops_end_quietly(f"during the final test; the checkpoint of step {step} is saved: test it with "
                               f"--resume=True --out_dir={shlex.quote(cfg.out_dir)}"):
            final_test(cfg, model, kind, space, corpus, device, out_dir, avg_interval)
    if ddp:
        dist.destroy_process_group()


# -----------------------------------------------------------------------------
# What the loop trains: a supernet, a standalone subnet, or one extracted from a supernet (finetuning)


def build_model(cfg: TrainConfig, corpus, passed, resumed=None):
    """(model, kind, model_args, space, fixed arch): a supernet (no --arch), a standalone subnet from scratch, or
    the subnet --arch extracted from the supernet --init (finetuning); a resumed run's from its own checkpoint alone
    (its model_args; the weights are loaded by the caller), never from --init again."""
    if resumed:
        model_args = resumed["model_args"]
        arch = ArchConfig.from_dict(model_args["arch"]) if resumed["kind"] == "standalone" else None
        return (build(resumed["kind"], model_args), resumed["kind"], model_args,
                mos.SearchSpace.from_dict(model_args["space"]), arch)
    space, vocab = SPACES[cfg.space], dict(src_vocab=len(corpus.src_vocab), tgt_vocab=len(corpus.tgt_vocab))
    supernet_ckpt = load_checkpoint(cfg.init) if cfg.init else None
    if supernet_ckpt:  # finetune: the arch is cut from this supernet, so its space and router are the ones used
        if supernet_ckpt["kind"] != "supernet":
            raise SystemExit(f"error: --init={cfg.init} holds a standalone model; finetuning extracts --arch from a "
                             f"supernet checkpoint (to continue a standalone run use --resume=True)")
        check_input(supernet_ckpt, corpus, cfg, passed, MODEL_SETTINGS, cfg.init)  # vocabularies, model settings
        space = mos.SearchSpace.from_dict(supernet_ckpt["model_args"]["space"])
    fixed_arch = read_arch(cfg.arch, space, ArchConfig) if cfg.arch else None  # runs/settings.py
    torch.manual_seed(cfg.seed)
    if fixed_arch is None:
        model_args = dict(space=space.to_dict(), **vocab, num_experts=cfg.num_experts, router=cfg.router,
                          router_hidden=cfg.router_hidden, dropout=cfg.dropout, max_len=1024)
        return build("supernet", model_args), "supernet", model_args, space, None
    model_args = dict(arch=fixed_arch.to_dict(), space=space.to_dict(), **vocab, dropout=cfg.dropout, max_len=1024)
    if not supernet_ckpt:
        return build("standalone", model_args), "standalone", model_args, space, fixed_arch
    # finetuning: the subnet inherits its weights from the supernet (front slices, and for every FFN the router's
    # mixture of the experts, computed once for this arch), then trains as a plain Transformer like any other
    subnet = model_from_checkpoint(supernet_ckpt).subnet(fixed_arch)  # the subnet's mixed, sliced weights
    model_args["max_len"] = subnet.max_len
    model = build("standalone", model_args)  # a standalone model of this arch: --dropout, width-scaled
    model.load_state_dict(subnet.state_dict())
    return model, "standalone", model_args, space, fixed_arch


# -----------------------------------------------------------------------------
# Evaluation: loss, beam-search translation and BLEU; validation during training, the final test, --eval_only


@torch.inference_mode()
def valid_loss(model, batches, bf16=False) -> float:
    """Loss of a plain model in nats per target token (plain cross-entropy, no smoothing) over (src, tgt_in,
    tgt_out) batches: train.py's validation and search.py's fitness."""
    total, ntok = 0.0, 0
    for src, tgt_in, tgt_out in batches:
        with torch.autocast(src.device.type, torch.bfloat16, enabled=bf16):
            total += token_loss(model(src, tgt_in), tgt_out, 0.0).item()
        ntok += int((tgt_out != PAD).sum())
    return total / ntok


@torch.inference_mode()
def translate_ids(model, sentences, device, beam=5, lenpen=1.0, bf16=False, batch_size=64):
    """Beam-search token ids for a list of source id arrays, batched by similar length, in input order."""
    order = sorted(range(len(sentences)), key=lambda i: len(sentences[i]))
    out = [None] * len(sentences)
    for k in range(0, len(order), batch_size):
        idx = order[k:k + batch_size]
        src = collate(sentences, sentences, idx)[0].to(device)
        with torch.autocast(device.type, torch.bfloat16, enabled=bf16):
            hyps, _ = mos.beam_search(model, src, beam=beam, lenpen=lenpen)
        for i, h in zip(idx, hyps):
            out[i] = h
    return out


def bleu_score(hyps, refs, compound_split=False):
    """Corpus BLEU the way MT papers quote these datasets: sacrebleu on BPE-removed, tokenised, lowercased text
    with tokenize='none'. compound_split: HAT's IWSLT/WMT "normal" BLEU (configs/*/test.sh), which first splits
    every hyphen between two characters into ` ##AT##-##AT## ` in hypotheses and references alike.
    Returns (score, signature)."""
    split = (lambda line: re.sub(r"(\S)-(\S)", r"\1 ##AT##-##AT## \2", line)) if compound_split else (lambda line: line)
    metric = BLEU(tokenize="none", force=True)  # force: the text is tokenised on purpose
    score = metric.corpus_score([split(remove_bpe(h)) for h in hyps], [[split(remove_bpe(r)) for r in refs]])
    return score.score, str(metric.get_signature()) + ("|compound-split" if compound_split else "")


def evaluate(model, corpus, split, device, max_tokens=4096, n_bleu=0, beam=5, lenpen=1.0, bf16=False,
             compound_split=False, hyps_path=None) -> dict:
    """Loss (nats/token, no smoothing) of a plain model on a split, and BLEU of beam search on its first n_bleu
    sentences (all if 0, none if < 0); compound_split adds HAT's IWSLT score as `bleu_compound_split`. With
    hyps_path, the translations behind the BLEU are written there, one BPE'd line per sentence in corpus order,
    so that any score can be recomputed or paired-tested later."""
    model.eval()
    result = {"loss": valid_loss(model, split_batches(corpus, split, max_tokens, device), bf16)}
    if n_bleu >= 0:
        src = corpus.splits[split][0]
        n = len(src) if n_bleu == 0 else min(n_bleu, len(src))
        hyps = translate_ids(model, [src[i] for i in range(n)], device, beam, lenpen, bf16)
        text, refs = [corpus.tgt_vocab.decode(h) for h in hyps], corpus.refs[split][:n]
        if hyps_path:
            write_lines(hyps_path, text)
        result["bleu"], result["bleu_signature"] = bleu_score(text, refs)
        if compound_split:
            result["bleu_compound_split"] = bleu_score(text, refs, compound_split=True)[0]
    return result


def run_evaluate(net, corpus, split, cfg: TrainConfig, device, n_bleu=0, hyps_path=None) -> dict:
    """evaluate() with the run's settings; on IWSLT14 also HAT's compound-split BLEU."""
    return evaluate(net, corpus, split, device, cfg.max_tokens, n_bleu, cfg.beam, cfg.lenpen, cfg.bf16,
                    compound_split=cfg.data == "iwslt14", hyps_path=hyps_path)


def representatives(model, kind, space) -> dict:
    """What a run is scored on: the one model, or a supernet's largest, smallest and middle subnets."""
    return {"model": model} if kind == "standalone" else {n: model.subnet(getattr(space, n)()) for n in NAMED_ARCHS}


def validate_and_log(model, kind, space, corpus, cfg, device, out_dir, step, epoch, train_seconds):
    """Loss (and BLEU) on valid for the representative subnets (or the one model), logged to log.jsonl."""
    record = {"step": step, "epoch": epoch, "train_seconds": train_seconds, "machine": machine()}  # a resume may move
    for name, net in representatives(model, kind, space).items():
        n_bleu = cfg.bleu_sentences if name in ("model", "largest", "smallest") else -1
        record[name] = run_evaluate(net, corpus, "valid", cfg, device, n_bleu=n_bleu)
    model.train()
    append_jsonl(out_dir / "log.jsonl", record)
    tqdm.write(valid_line(record))


def final_test(cfg, model, kind, space, corpus, device, out_dir, avg_interval=1):
    """Test BLEU of the final (optionally snapshot-averaged) model, written to results.json and log.jsonl with the
    decoding's precision (the run's) and machine, the translations behind each score in hyps_<split>_<name>.txt."""
    if cfg.avg_last > 0:  # HAT: the mean of the last avg_last snapshots' weights (runs/checkpoints.py)
        average_snapshots(model, cfg, avg_interval, out_dir, lambda path: load_checkpoint(path, kinds=("snapshot",)))
    results = {"split": cfg.split, "precision": "bf16" if cfg.bf16 else "fp32", "machine": machine()}  # of the decode
    for name, net in representatives(model, kind, space).items():
        t = time.time()
        results[name] = run_evaluate(net, corpus, cfg.split, cfg, device, n_bleu=cfg.test_sentences,
                                     hyps_path=out_dir / f"hyps_{cfg.split}_{name}.txt")
        results[name]["decode_seconds"] = round(time.time() - t, 1)
        same = name == "middle" and space.middle() == space.largest()  # (a space of two-choice fields)
        note = " (the largest subnet: in this space every choice of middle is the largest)" if same else ""
        print(f"{cfg.split} {name}: {score_line(results[name])}{note}")
    write_json(out_dir / "results.json", results)
    append_jsonl(out_dir / "log.jsonl", {"final": results})


def evaluate_or_translate(cfg, corpus, device, passed=()):
    """--eval_only: loss and BLEU of --init (a standalone model, or a supernet's --arch) on --split.
    --translate: translate lines of tokenised, BPE'd (for the real corpora) source text to stdout."""
    cfg = replace(cfg, bf16=fast_bf16(device) if cfg.bf16 is None else cfg.bf16)  # decoding: bf16 where native
    ckpt = load_checkpoint(cfg.init, device)
    check_input(ckpt, corpus, cfg, passed, MODEL_SETTINGS, cfg.init)
    model = model_from_checkpoint(ckpt).to(device)
    if ckpt["kind"] == "supernet":
        model = model.subnet(read_arch(cfg.arch or "largest", model.space, ArchConfig))
    if cfg.translate:
        sentences = [np.array(corpus.src_vocab.encode(s) + [EOS]) for s in read_lines(cfg.translate, "--translate")]
        for hyp in translate_ids(model.eval(), sentences, device, cfg.beam, cfg.lenpen, cfg.bf16):
            print(corpus.tgt_vocab.decode(hyp))
        return
    print(f"{cfg.split}: {score_line(run_evaluate(model, corpus, cfg.split, cfg, device, cfg.test_sentences))}")


# -----------------------------------------------------------------------------
# From a checkpoint to a model: checkpoints are plain dicts (runs/checkpoints.py) holding the model's constructor
# arguments (model_args, which mos.build builds from) beside its weights


def model_from_checkpoint(ckpt: dict):
    """Rebuild the supernet or standalone model a (checked) checkpoint holds, with its weights."""
    model = build(ckpt["kind"], ckpt["model_args"])
    model.load_state_dict(ckpt["model"])
    return model


def load_checkpoint(path, device="cpu", kinds=KINDS, resume=False) -> dict:
    """A checkpoint of train.py, loaded safely and checked whole (runs.checkpoints), or one line `error: ...`."""
    return checkpoints.load_checkpoint(path, build, TrainConfig, device, kinds, resume)


if __name__ == "__main__":
    run(main, resume_hint="continue with --resume=True if it saved a checkpoint")
