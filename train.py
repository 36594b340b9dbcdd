"""
Train a Mixture-of-Supernets supernet, a standalone subnet, or finetune an extracted subnet; evaluate with BLEU.

    python train.py                                        # neuron-wise MoS supernet, Multi30k, CPU preset
    python train.py --router=none --num_experts=1 --sampling=random   # HAT's weight-sharing supernet
    python train.py --arch=best.json                       # a standalone subnet from scratch (the baseline)
    python train.py --arch=best.json --init=out/ckpt.pt    # finetune the subnet extracted from a supernet
    python train.py --eval_only=True --init=out/ckpt.pt --arch=largest    # test BLEU of one (sub)net
    echo "ein hund läuft ." | python train.py --translate=- --init=out/ckpt.pt --arch=largest
    torchrun --nproc_per_node=2 train.py ...               # data-parallel, one shard per rank

Settings are the TrainConfig fields below, changed with --key=value; --preset=NAME picks a named set first.
"""

import ast
import hashlib
import json
import math
import os
import random
import re
import signal
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from sacrebleu.metrics import BLEU
from tqdm import tqdm

import mos
from common import (brief, build_standalone, build_supernet, check_settings, defer_stop_signals, get_device,
                    load_checkpoint, lock_folder, model_from_checkpoint, releases_locks, run, save_checkpoint)
from data.batching import TokenBatcher, atomic_open, collate, load_corpus, make_toy_corpus, remove_bpe
from mos import PAD, SPACES, ArchConfig

ROOT = Path(__file__).resolve().parent

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
    space: str = "cpu"  # search space in mos.SPACES: cpu | iwslt14 | tiny
    router: str = "neuron"  # none (HAT weight sharing) | layer | neuron (MoS)
    num_experts: int = 2  # m in the paper; 1 with router=none
    router_hidden: int = 128
    dropout: float = 0.3  # scaled with width per subnet (HAT)
    # what to train: a supernet (arch empty), or one subnet (arch = JSON file | largest | smallest | middle)
    arch: str = ""
    init: str = ""  # supernet checkpoint to extract `arch` from (finetune); with eval_only/translate: the model
    sampling: str = "sandwich"  # sandwich: largest + smallest + n_random random per step (MoS) | random: one (HAT)
    n_random: int = 1
    distill: bool = False  # in-place distillation: the largest subnet's distribution teaches the others
    # optimisation
    max_steps: int = 1500
    lr: float = 1e-3
    warmup: int = 500  # linear warm-up from warmup_init_lr, then inverse square root
    warmup_init_lr: float = 1e-7
    weight_decay: float = 1e-4
    label_smoothing: float = 0.1
    clip: float = 25.0  # gradient-norm clip (fairseq default); 0 = off
    bf16: bool = False  # bfloat16 autocast for forward passes (the multi30k preset: on where it runs natively)
    # evaluation and output
    out_dir: str = "out"
    eval_interval: int = 500  # steps between validations (each also writes ckpt.pt)
    save_interval: int = 100  # also write ckpt.pt every this many steps, so a kill costs little (0 = off)
    log_interval: int = 50
    bleu_sentences: int = 0  # validation BLEU on the first N valid sentences; 0 = all, -1 = no BLEU during training
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
    resume: bool = False  # continue out_dir/ckpt.pt exactly where it stopped
    max_minutes: float = 0.0  # stop (and save) after this much training time; 0 = no limit
    max_bad_steps: int = 10  # stop after this many non-finite losses in a row (each such step is skipped)


def fast_bf16() -> bool:
    """Whether bf16 autocast runs natively here: a CUDA GPU with bf16, or an x86 CPU with AVX-512 bf16 or AMX
    instructions. Elsewhere a CPU emulates bf16 and is slower than fp32, so fp32 is kept."""
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    cpuinfo = Path("/proc/cpuinfo")
    flags = cpuinfo.read_text() if cpuinfo.exists() else ""
    return "avx512_bf16" in flags or "amx_bf16" in flags


PRESETS = {
    # 2-core CPU, about 50 minutes (README): the scaled-down space on Multi30k
    # (max_minutes is a guard so the run ends within the hour even on a slower or busy machine; bf16 where native:
    # 1.3x fp32's tokens/s on this project's CPU at the same test BLEU within noise, README Performance)
    "multi30k": dict(data="multi30k", space="cpu", max_tokens=4096, lr=1e-3, warmup=500, max_steps=1500,
                     dropout=0.3, eval_interval=500, max_minutes=55.0, bf16=fast_bf16()),
    # HAT's IWSLT14 De-En recipe (METHOD 4.2): one GPU, 4096 tokens, 40K updates (MoS), lr 5e-4, 10K warm-up
    "iwslt14": dict(data="iwslt14", space="iwslt14", max_tokens=4096, lr=5e-4, warmup=10000, max_steps=40000,
                    dropout=0.375, weight_decay=1e-4, clip=25.0, eval_interval=4000, bleu_sentences=1000,
                    avg_last=10),
    # the synthetic reversal task: no files, seconds on a CPU (tests, demos)
    "toy": dict(data="toy", space="tiny", max_tokens=1024, lr=2e-3, warmup=100, max_steps=300, dropout=0.1,
                eval_interval=100, log_interval=20, bleu_sentences=100, router_hidden=32),
}


# what a resumed run may change on the command line: how long it runs and how often it reports, never what it trains
RUNTIME_SETTINGS = ("resume", "max_steps", "max_minutes", "out_dir", "device", "eval_interval", "save_interval",
                    "log_interval", "bleu_sentences", "test_sentences", "max_bad_steps")
MODEL_SETTINGS = ("space", "router", "num_experts", "router_hidden")  # what a supernet checkpoint fixes


def split_args(argv):
    """['--key=value', ...] -> [(key, value text), ...]; anything else is a one-line error."""
    for arg in argv:
        if not (arg.startswith("--") and "=" in arg):
            raise SystemExit(f"error: bad argument {arg!r}; use --key=value")
    return [tuple(arg[2:].split("=", 1)) for arg in argv]


def apply_overrides(cfg, pairs):
    """Set each (key, text) on dataclass instance cfg: the text is read as a Python literal (a bare word is a
    string, a list fills a tuple field) and must match the field's type. Shared by train, latency and search."""
    types = {f.name: f.type for f in fields(cfg)}
    for key, text in pairs:
        if key not in types:
            raise SystemExit(f"error: unknown setting --{key}; settings are {list(types)}")
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text
        if types[key] is bool and text.lower() in ("true", "false"):
            value = text.lower() == "true"
        if types[key] is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if types[key] is tuple and isinstance(value, list):
            value = tuple(value)
        if type(value) is not types[key]:
            raise SystemExit(f"error: --{key}={text} should be a {types[key].__name__}")
        setattr(cfg, key, value)
    return cfg


def check_same(stored: dict, cfg, keys, path):
    """Refuse settings given on the command line that contradict those a checkpoint was made with, naming each."""
    norm = lambda v: json.loads(json.dumps(v))  # tuples and lists compare equal
    clashes = [f"--{k}={getattr(cfg, k)} (it has {stored.get(k)})" for k in keys
               if k in stored and norm(getattr(cfg, k)) != norm(stored[k])]
    if clashes:
        raise SystemExit(f"error: checkpoint {path} was made with other settings than {', '.join(clashes)}; "
                         f"drop these flags (the checkpoint's own are used) or use another checkpoint/--out_dir")


def parse_config(argv, cls=TrainConfig, presets=PRESETS):
    """--preset=NAME first (a dict of `presets`), then every --key=value on top. Also reproduce.py's parser."""
    pairs = split_args(argv)
    preset = dict(pairs).get("preset", cls.preset)
    if preset not in presets:
        raise SystemExit(f"error: unknown preset {preset!r}; choose one of {list(presets)}")
    return apply_overrides(cls(**{**presets[preset], "preset": preset}), pairs)


# the range of every numeric setting (None: unbounded) and the choices of the named ones, checked after parsing
LIMITS = dict(max_tokens=(1, None), num_experts=(1, None), router_hidden=(1, None), dropout=(0, 1), n_random=(0, None),
              max_steps=(0, None), lr=(0, None), warmup=(0, None), warmup_init_lr=(0, None), weight_decay=(0, None),
              label_smoothing=(0, 1), clip=(0, None), eval_interval=(1, None), save_interval=(0, None),
              log_interval=(1, None), bleu_sentences=(-1, None), beam=(1, None), lenpen=(0, None),
              test_sentences=(0, None), avg_last=(0, None), seed=(0, None), max_minutes=(0, None),
              max_bad_steps=(1, None))
CHOICES = dict(preset=PRESETS, data=("multi30k", "iwslt14", "toy"), space=SPACES, router=("none", "layer", "neuron"),
               sampling=("sandwich", "random"), split=("train", "valid", "test"))


# -----------------------------------------------------------------------------
# Data, models and checkpoints


def load_data(cfg: TrainConfig):
    """The corpus of cfg.data, preparing Multi30k/IWSLT14 first if their folder is missing."""
    if cfg.data == "toy":
        return make_toy_corpus(seed=cfg.seed)
    folder = Path(cfg.data_dir or ROOT / "data" / cfg.data)
    if not (folder / "summary.json").exists():
        from data.prepare import DataError, prepare_iwslt14, prepare_multi30k
        prepare = {"multi30k": prepare_multi30k, "iwslt14": prepare_iwslt14}[cfg.data]
        print(f"{folder} is not prepared yet: running data/prepare.py {cfg.data}")
        try:
            prepare(source=cfg.data_source or None, out=folder)
        except DataError as e:
            raise SystemExit(f"error: {e} (from train.py: pass --data_source=PATH, e.g. "
                             f"--data_source=../shared/data/multi30k/tok)")
    try:
        return load_corpus(folder)
    except Exception as e:  # a missing, empty, truncated or non-UTF-8 file of the prepared folder
        raise SystemExit(f"error: cannot read the prepared corpus in {folder} ({brief(e)}); prepare it again with "
                         f"data/prepare.py --force")


def resolve_arch(spec: str, space) -> ArchConfig:
    """'largest' | 'smallest' | 'middle' | a JSON file written by search.py or by hand."""
    if spec in ("largest", "smallest", "middle"):
        return getattr(space, spec)()
    try:
        return space.validate(ArchConfig.from_dict(json.loads(Path(spec).read_text())))
    except (OSError, json.JSONDecodeError, RecursionError) as e:  # RecursionError: JSON nested too deeply
        raise SystemExit(f"error: cannot read arch file {spec!r} ({e}); give largest|smallest|middle or a JSON file")
    except ValueError as e:
        raise SystemExit(f"error: arch file {spec}: {e}")


# build_supernet, build_standalone, load_checkpoint (validated), model_from_checkpoint and save_checkpoint (with a
# checksum) live in common.py, shared with search, latency and bench; imported above, also as train.load_checkpoint


# -----------------------------------------------------------------------------
# Loss, schedule, evaluation


def make_optimizer(model, cfg: TrainConfig):
    """fairseq's Adam as HAT and MoS train with it: betas (0.9, 0.98), eps 1e-8 and *decoupled* weight decay,
    p -= lr * wd * p (AdamW), applied beside the Adam step. Coupled L2 decay (torch Adam's weight_decay) would be
    normalised by Adam like a gradient and wipe, at about lr per step, the weights that get no gradient: rare
    embedding rows and the outer supernet slices that small subnets never use."""
    return torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.98), eps=1e-8,
                             weight_decay=cfg.weight_decay)


def is_snapshot_step(step: int, cfg: TrainConfig, interval: int) -> bool:
    """Whether the weights after `step` are one of the avg_last snapshots averaged for the final test: every
    `interval` steps counted back from max_steps, the last avg_last of them (HAT: the last 10 epoch checkpoints)."""
    before_end = cfg.max_steps - step
    return cfg.avg_last > 0 and 0 <= before_end < cfg.avg_last * interval and before_end % interval == 0


def lr_at(step: int, cfg: TrainConfig) -> float:
    """fairseq's inverse_sqrt: linear warm-up from warmup_init_lr to lr, then lr * sqrt(warmup / step)."""
    if step < cfg.warmup:
        return cfg.warmup_init_lr + (cfg.lr - cfg.warmup_init_lr) * step / cfg.warmup
    return cfg.lr * math.sqrt(cfg.warmup / max(step, 1))


def token_loss(logits, tgt_out, label_smoothing, soft_targets=None):
    """Summed label-smoothed cross-entropy over the non-pad target tokens (nats); with soft_targets (B, T, V),
    the cross-entropy against that distribution instead (in-place distillation)."""
    logits = logits.float().flatten(0, 1)  # (B*T, V)
    mask = tgt_out.flatten() != PAD
    if soft_targets is not None:
        return -(soft_targets.flatten(0, 1)[mask] * logits[mask].log_softmax(-1)).sum()
    return F.cross_entropy(logits, tgt_out.flatten(), ignore_index=PAD, label_smoothing=label_smoothing,
                           reduction="sum")


def bleu_score(hyps, refs, compound_split=False):
    """Corpus BLEU the way MT papers quote these datasets: sacrebleu on BPE-removed, tokenised, lowercased text
    with tokenize='none'. compound_split: HAT's IWSLT/WMT "normal" BLEU (configs/*/test.sh), which first splits
    every hyphen between two characters into ` ##AT##-##AT## ` in hypotheses and references alike.
    Returns (score, signature)."""
    split = (lambda line: re.sub(r"(\S)-(\S)", r"\1 ##AT##-##AT## \2", line)) if compound_split else (lambda line: line)
    metric = BLEU(tokenize="none", force=True)  # force: the text is tokenised on purpose
    score = metric.corpus_score([split(remove_bpe(h)) for h in hyps], [[split(remove_bpe(r)) for r in refs]])
    return score.score, str(metric.get_signature()) + ("|compound-split" if compound_split else "")


@torch.inference_mode()
def evaluate(model, corpus, split, cfg, device, n_bleu=0, max_tokens=None, hyps_path=None):
    """Validation loss (nats/token, no smoothing) of a plain model on a split, and BLEU of beam search on its
    first n_bleu sentences (all if 0, none if < 0). With hyps_path, the translations behind the BLEU are written
    there, one BPE'd line per sentence in corpus order, so any score can be recomputed or paired-tested later."""
    model.eval()
    src, tgt = corpus.splits[split]
    batcher = TokenBatcher([len(s) for s in src], [len(t) for t in tgt], max_tokens or cfg.max_tokens, shuffle=False)
    total, ntok = 0.0, 0
    for idx in batcher.batches(0):
        s, ti, to = (x.to(device) for x in collate(src, tgt, idx))
        with torch.autocast(device.type, torch.bfloat16, enabled=cfg.bf16):
            total += token_loss(model(s, ti), to, 0.0).item()
        ntok += int((to != PAD).sum())
    result = {"loss": total / ntok}
    if n_bleu >= 0:
        n = len(src) if n_bleu == 0 else min(n_bleu, len(src))
        hyps = translate_ids(model, [src[i] for i in range(n)], cfg, device)
        text, refs = [corpus.tgt_vocab.decode(h) for h in hyps], corpus.refs[split][:n]
        if hyps_path:
            with atomic_open(hyps_path) as f:
                f.write("".join(line + "\n" for line in text))
        result["bleu"], result["bleu_signature"] = bleu_score(text, refs)
        if cfg.data == "iwslt14":  # HAT's table quotes compound-split BLEU on IWSLT: report it beside ours
            result["bleu_compound_split"] = bleu_score(text, refs, compound_split=True)[0]
    return result


def translate_ids(model, sentences, cfg, device, batch_size=64):
    """Beam-search token ids for a list of source id arrays, batched by similar length, in input order."""
    order = sorted(range(len(sentences)), key=lambda i: len(sentences[i]))
    out = [None] * len(sentences)
    for k in range(0, len(order), batch_size):
        idx = order[k:k + batch_size]
        src = collate(sentences, sentences, idx)[0].to(device)
        with torch.autocast(device.type, torch.bfloat16, enabled=cfg.bf16):
            hyps, _ = mos.beam_search(model, src, beam=cfg.beam, lenpen=cfg.lenpen)
        for i, h in zip(idx, hyps):
            out[i] = h
    return out


# -----------------------------------------------------------------------------
# The run


@releases_locks
def main(argv):
    cfg, passed = parse_config(argv), dict(split_args(argv))
    # ---- system: data-parallel ranks under torchrun, device, threads
    ddp = int(os.environ.get("WORLD_SIZE", 1)) > 1
    device = get_device(cfg.device, auto=True)
    if ddp:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
            torch.cuda.set_device(device)
    else:
        rank, world = 0, 1
    master = rank == 0
    out_dir = Path(cfg.out_dir)
    ckpt_path = out_dir / "ckpt.pt"
    if master and cfg.resume:  # one writer per run folder, taken before reading the checkpoint it continues
        lock_folder(out_dir, create=False)
    resumed = load_checkpoint(ckpt_path, resume=True) if cfg.resume else None
    if resumed:  # the stored settings win; the command line may only change how long and how often (RUNTIME)
        check_same(resumed["config"], cfg, [k for k in passed if k not in RUNTIME_SETTINGS], ckpt_path)
        cfg = TrainConfig(**{**resumed["config"], **{k: getattr(cfg, k) for k in passed if k in RUNTIME_SETTINGS},
                             "resume": True})
    check_settings(asdict(cfg), LIMITS, CHOICES)
    if cfg.bf16 and not fast_bf16():
        print("warning: --bf16=True where bf16 is not native (a CPU without AVX-512 BF16/AMX, or such a GPU): emulated "
              "bf16 can be ~100x slower than fp32 here; --bf16=False is faster", file=sys.stderr)
    corpus = load_data(cfg)
    src_vocab, tgt_vocab = len(corpus.src_vocab), len(corpus.tgt_vocab)
    space = SPACES[cfg.space]

    # ---- the model: supernet, standalone subnet, or subnet extracted from a supernet
    if cfg.eval_only or cfg.translate:
        return evaluate_or_translate(cfg, corpus, device, passed)
    if cfg.router == "none" and cfg.num_experts != 1:
        raise SystemExit("error: --router=none is plain weight sharing with one expert: add --num_experts=1")
    supernet_ckpt = load_checkpoint(cfg.init) if cfg.init else None
    if supernet_ckpt:  # finetune: the arch is cut from this supernet, so its space and router are the ones used
        if supernet_ckpt["kind"] != "supernet":
            raise SystemExit(f"error: --init={cfg.init} holds a standalone model; finetuning extracts --arch from a "
                             f"supernet checkpoint (to continue a standalone run use --resume=True)")
        check_vocab(supernet_ckpt, corpus, cfg.init)
        check_same(supernet_ckpt["config"], cfg, [k for k in passed if k in MODEL_SETTINGS], cfg.init)
        space = mos.SearchSpace.from_dict(supernet_ckpt["model_args"]["space"])
    fixed_arch = resolve_arch(cfg.arch, space) if cfg.arch else None
    if fixed_arch is None:
        kind = "supernet"
        model_args = dict(space=space.to_dict(), src_vocab=src_vocab, tgt_vocab=tgt_vocab,
                          num_experts=cfg.num_experts, router=cfg.router, router_hidden=cfg.router_hidden,
                          dropout=cfg.dropout, max_len=1024)
        torch.manual_seed(cfg.seed)
        model = build_supernet(model_args)
    else:
        kind = "standalone"
        model_args = dict(arch=fixed_arch.to_dict(), space=space.to_dict(), src_vocab=src_vocab,
                          tgt_vocab=tgt_vocab, dropout=cfg.dropout, max_len=1024)
        torch.manual_seed(cfg.seed)
        if supernet_ckpt:  # finetune: the subnet's mixed, sliced weights from a trained supernet
            model = model_from_checkpoint(supernet_ckpt).subnet(fixed_arch)
            model_args["space"], model_args["max_len"] = supernet_ckpt["model_args"]["space"], model.max_len
        else:
            model = build_standalone(model_args)
    model.to(device)
    optimizer = make_optimizer(model, cfg)
    step, epoch, batch_in_epoch, start_time = 0, 0, 0, 0.0
    if resumed:
        model.load_state_dict(resumed["model"])
        optimizer.load_state_dict(resumed["optimizer"])
        step, epoch, batch_in_epoch = resumed["step"], resumed["data"]["epoch"], resumed["data"]["batch"]
        start_time = resumed["train_seconds"]
    if master:
        lock_folder(out_dir)  # one writer per run folder: another train.py here stops, naming this one's pid
        for name in ("train_log.jsonl", "log.jsonl"):  # a fresh run starts fresh logs; a resumed one drops the
            if resumed:  # steps a killed run logged after its last checkpoint (they are redone)
                trim_jsonl(out_dir / name, resumed["step"])
            else:
                (out_dir / name).unlink(missing_ok=True)
        if not resumed:  # averaging snapshots of an earlier run in this folder must not be averaged into this one
            for old in out_dir.glob("ckpt_step*.pt"):
                old.unlink()
        write_json(out_dir / "config.json", asdict(cfg))
        n_params = sum(p.numel() for p in model.parameters())
        print(f"{kind} ({cfg.router} x{cfg.num_experts} experts)" if kind == "supernet" else f"standalone {fixed_arch}",
              f"| {n_params / 1e6:.2f}M parameters | {cfg.data} | device {device} x{world} | "
              f"{torch.get_num_threads()} threads | {'resuming at step ' + str(step) if resumed else 'from scratch'}")

    src, tgt = corpus.splits["train"]
    batcher = TokenBatcher([len(s) for s in src], [len(t) for t in tgt], cfg.max_tokens, seed=cfg.seed,
                           rank=rank, world_size=world)
    representative = {name: getattr(space, name)() for name in ("largest", "smallest", "middle")}
    avg_interval = cfg.avg_interval or len(batcher.batches(0))  # default: one epoch of this rank's batches

    def subnets_for(step):
        """This step's subnets; seeded by the step alone, so every rank (and a resumed run) samples the same."""
        if fixed_arch is not None:
            return [None]
        rng = random.Random(cfg.seed * 1_000_003 + step)
        if cfg.sampling == "random":
            return [space.sample(rng)]
        return [space.largest(), space.smallest()] + [space.sample(rng) for _ in range(cfg.n_random)]

    def checkpoint(path=ckpt_path):
        if not all(torch.isfinite(p).all() for p in model.parameters()):  # never overwrite a good checkpoint
            raise SystemExit(f"error: the weights are not finite at step {step}; kept the last checkpoint {path}")
        save_checkpoint(dict(kind=kind, model=model.state_dict(), model_args=model_args, config=asdict(cfg),
                             optimizer=optimizer.state_dict(), step=step, data=dict(epoch=epoch, batch=batch_in_epoch),
                             vocab=dict(src=corpus.src_vocab.itos, tgt=corpus.tgt_vocab.itos),
                             train_seconds=start_time + time.time() - t0, torch_version=str(torch.__version__)), path)

    def validate():
        """Loss (and BLEU) on valid for the representative subnets (or the one model), logged to log.jsonl."""
        record = {"step": step, "epoch": epoch, "train_seconds": round(start_time + time.time() - t0, 1)}
        targets = {"model": model} if kind == "standalone" else {n: model.subnet(a) for n, a in representative.items()}
        for name, net in targets.items():
            n_bleu = cfg.bleu_sentences if name in ("model", "largest", "smallest") else -1
            record[name] = evaluate(net, corpus, "valid", cfg, device, n_bleu=n_bleu)
        model.train()
        append_jsonl(out_dir / "log.jsonl", record)
        tqdm.write(f"step {step} valid | " + " | ".join(
            f"{n} loss {r['loss']:.3f}" + (f" bleu {r['bleu']:.2f}" if "bleu" in r else "")
            for n, r in record.items() if isinstance(r, dict)))

    # ---- the training loop: every step trains this step's subnets on one batch, one optimizer update
    model.train()
    t0, tokens_seen, log_t = time.time(), 0, time.time()
    batches = batcher.batches(epoch)
    bar = tqdm(total=cfg.max_steps, initial=step, disable=not master or None, dynamic_ncols=True)
    interrupted, bad_steps, skipped = [], 0, 0
    restore_signals = defer_stop_signals(interrupted)  # Ctrl-C and SIGTERM (schedulers): stop after this step
    while step < cfg.max_steps:
        if batch_in_epoch >= len(batches):
            epoch, batch_in_epoch = epoch + 1, 0
            batches = batcher.batches(epoch)
        s, ti, to = (x.to(device) for x in collate(src, tgt, batches[batch_in_epoch]))
        batch_in_epoch += 1
        lr = lr_at(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        torch.manual_seed(cfg.seed * 1_000_003 + step * world + rank)  # dropout: reproducible per step and rank
        archs, losses, teacher = subnets_for(step), {}, None
        ntok = (to != PAD).sum()
        for i, arch in enumerate(archs):  # sandwich rule: accumulate the gradients of all subnets, one update
            with torch.autocast(device.type, torch.bfloat16, enabled=cfg.bf16):
                logits = model(s, ti) if arch is None else model(s, ti, arch)
            soft = teacher if (cfg.distill and i > 0) else None
            loss = token_loss(logits, to, cfg.label_smoothing, soft) / ntok
            (loss / len(archs)).backward()  # the mean over subnets, as MoS normalises by all passes' tokens
            if cfg.distill and i == 0:
                teacher = logits.detach().float().softmax(-1)
            losses[i] = loss.item()
        if ddp:  # data parallel: average the gradients over ranks (all ranks trained the same subnets)
            for p in model.parameters():
                if p.grad is not None:
                    dist.all_reduce(p.grad)
                    p.grad /= world
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip if cfg.clip > 0 else math.inf)
        if all(map(math.isfinite, losses.values())) and torch.isfinite(grad_norm):
            optimizer.step()
            bad_steps = 0
        else:  # a non-finite loss or gradient: skip this update, and stop if it keeps happening
            bad_steps, skipped = bad_steps + 1, skipped + 1
            tqdm.write(f"step {step}: non-finite loss {losses} or gradient norm; update skipped ({skipped} so far)")
            if bad_steps >= cfg.max_bad_steps:
                raise SystemExit(f"error: {bad_steps} non-finite steps in a row at step {step}; stopping with the "
                                 f"last checkpoint intact (try a lower --lr or --clip)")
        optimizer.zero_grad(set_to_none=True)
        step += 1
        tokens_seen += int(ntok) * world
        if master:
            names = ["model"] if fixed_arch is not None else (["L", "S"] + [f"R{k}" for k in range(cfg.n_random)]
                                                               if cfg.sampling == "sandwich" else ["R"])
            record = {"step": step, "lr": lr, **{n: round(v, 4) for n, v in zip(names, losses.values())}}
            bar.set_postfix(loss=f"{np.mean(list(losses.values())):.3f}", lr=f"{lr:.1e}",
                            tok_s=f"{tokens_seen / (time.time() - log_t):.0f}")
            bar.update(1)
            if step % cfg.log_interval == 0:
                record["tok_per_s"] = round(tokens_seen / (time.time() - log_t))
                tokens_seen, log_t = 0, time.time()
                append_jsonl(out_dir / "train_log.jsonl", record)
        if master and is_snapshot_step(step, cfg, avg_interval):  # weights only, for the final average
            save_checkpoint(dict(kind="snapshot", model=model.state_dict(), step=step), out_dir / f"ckpt_step{step}.pt")
        out_of_time = cfg.max_minutes > 0 and (start_time + time.time() - t0) / 60 > cfg.max_minutes
        at_eval = step % cfg.eval_interval == 0 or step == cfg.max_steps  # a signal waits for this validation, so
        stop = torch.tensor(int(out_of_time or (bool(interrupted) and not at_eval)))  # a resumed run repeats it
        if ddp:  # every rank stops at the same step
            dist.all_reduce(stop, op=dist.ReduceOp.MAX)
        if stop:
            if master:
                if out_of_time and cfg.bleu_sentences >= 0:
                    validate()
                checkpoint()
                why = signal.Signals(interrupted[0]).name if interrupted else "max_minutes reached"
                tqdm.write(f"stopped at step {step} ({why}); "
                           f"checkpoint saved, continue with --resume=True --out_dir={cfg.out_dir}")
            if interrupted:
                restore_signals()
                return
            break
        if step % cfg.eval_interval == 0 or step == cfg.max_steps:
            if master:
                if cfg.bleu_sentences >= 0 or step == cfg.max_steps:
                    validate()
                checkpoint()
        elif master and cfg.save_interval > 0 and step % cfg.save_interval == 0:
            checkpoint()
    bar.close()
    restore_signals()
    if ddp:  # check that the replicas stayed in sync: same subnets every step, same weights at the end
        digest = [float(sum(p.double().sum() for p in model.parameters())),
                  hashlib.sha256(str([subnets_for(k) for k in range(step)]).encode()).hexdigest()]
        digests = [None] * world
        dist.all_gather_object(digests, digest)
        if master:
            write_json(out_dir / "ddp_check.json", {"rank_digests": digests, "in_sync": digests.count(digest) == world})
            if digests.count(digest) != world:
                raise SystemExit(f"error: data-parallel replicas diverged: {digests}")
    if master:
        final_test(cfg, model, kind, representative, corpus, device, out_dir, avg_interval)
    if ddp:
        dist.destroy_process_group()


def final_test(cfg, model, kind, representative, corpus, device, out_dir, avg_interval=1):
    """Test BLEU of the final (optionally snapshot-averaged) model, written to results.json and log.jsonl."""
    if cfg.avg_last > 0:
        steps = [s for s in range(cfg.max_steps + 1) if is_snapshot_step(s, cfg, avg_interval)]
        snapshots = [out_dir / f"ckpt_step{s}.pt" for s in steps if (out_dir / f"ckpt_step{s}.pt").exists()]
        if snapshots:  # a run stopped early (max_minutes) has fewer, possibly none
            states = [load_checkpoint(p, kinds=("snapshot",))["model"] for p in snapshots]
            model.load_state_dict({k: sum(s[k].float() for s in states) / len(states) for k in states[0]})
        print(f"averaged {len(snapshots)} of {len(steps)} snapshots (steps {steps[0]}..{steps[-1]}, every "
              f"{avg_interval})" if snapshots else f"no averaging snapshot was written (the run stopped before step "
              f"{steps[0]}): testing the last weights")
    targets = {"model": model} if kind == "standalone" else {n: model.subnet(a) for n, a in representative.items()}
    results = {"split": cfg.split}
    for name, net in targets.items():
        t = time.time()
        results[name] = evaluate(net, corpus, cfg.split, cfg, device, n_bleu=cfg.test_sentences,
                                 hyps_path=out_dir / f"hyps_{cfg.split}_{name}.txt")
        results[name]["decode_seconds"] = round(time.time() - t, 1)
        r = results[name]
        print(f"{cfg.split} {name}: loss {r['loss']:.3f} | BLEU {r['bleu']:.2f} | {r['bleu_signature']}"
              + (f" | compound-split BLEU (HAT's tables) {r['bleu_compound_split']:.2f}" if "bleu_compound_split" in r else ""))
    write_json(out_dir / "results.json", results)
    append_jsonl(out_dir / "log.jsonl", {"final": results})


def check_vocab(ckpt, corpus, path):
    """Refuse a checkpoint trained with other vocabularies than this corpus's."""
    if ckpt["vocab"]["src"] != corpus.src_vocab.itos or ckpt["vocab"]["tgt"] != corpus.tgt_vocab.itos:
        raise SystemExit(f"error: checkpoint {path} was trained with other vocabularies than data "
                         f"{corpus.name!r}; pass the --data/--data_dir it was trained on")


def evaluate_or_translate(cfg, corpus, device, passed=()):
    """--eval_only: loss and BLEU of --init (a standalone model, or a supernet's --arch) on --split.
    --translate: translate lines of tokenised, BPE'd (for the real corpora) source text to stdout."""
    if not cfg.init:
        raise SystemExit("error: --eval_only/--translate need --init=CHECKPOINT")
    ckpt = load_checkpoint(cfg.init, device)
    check_vocab(ckpt, corpus, cfg.init)
    check_same(ckpt["config"], cfg, [k for k in passed if k in MODEL_SETTINGS], cfg.init)
    model = model_from_checkpoint(ckpt).to(device)
    if ckpt["kind"] == "supernet":
        space = model.space
        model = model.subnet(resolve_arch(cfg.arch or "largest", space))
    if cfg.translate:
        try:
            lines = (sys.stdin if cfg.translate == "-" else open(cfg.translate, encoding="utf-8")).read().splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise SystemExit(f"error: cannot read --translate={cfg.translate} ({e}); give a UTF-8 text file or -")
        sentences = [np.array(corpus.src_vocab.encode(line) + [mos.EOS]) for line in lines]
        for hyp in translate_ids(model.eval(), sentences, cfg, device):
            print(corpus.tgt_vocab.decode(hyp))
        return
    r = evaluate(model, corpus, cfg.split, cfg, device, n_bleu=cfg.test_sentences)
    print(f"{cfg.split}: loss {r['loss']:.3f} | BLEU {r['bleu']:.2f} | {r['bleu_signature']}")
    print(json.dumps(r))


def write_json(path: Path, obj):
    """Write JSON atomically (temporary file, then rename)."""
    with atomic_open(path) as f:
        f.write(json.dumps(obj, indent=2) + "\n")


def append_jsonl(path: Path, record: dict):
    """One JSON record per line, appended."""
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def read_jsonl(path: Path) -> list:
    """The whole records of a JSON-lines log (a line a kill cut short is left out); [] if there is no log."""
    records = []
    for line in (path.read_text().splitlines(keepends=True) if path.exists() else []):
        if not line.endswith("\n"):  # the last line of a killed run may be half written
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def trim_jsonl(path: Path, last_step: int):
    """Keep the whole records up to `last_step`, so a resumed run's log reads as if it had never stopped."""
    if path.exists():
        kept = [r for r in read_jsonl(path) if r.get("step", last_step) <= last_step]
        with atomic_open(path) as f:
            f.write("".join(json.dumps(r) + "\n" for r in kept))


if __name__ == "__main__":
    run(main, resume_hint="continue with --resume=True if it saved a checkpoint")
