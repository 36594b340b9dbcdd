"""
What train.py, latency.py, search.py, bench.py and reproduce.py share, so that no script imports another's internals:
  - settings: `--key=value` onto a dataclass, presets, and the checks every command makes alike;
  - data and evaluation: the corpus, arch files, the loss, validation loss, beam-search translation and BLEU;
  - checkpoints (saved atomically with a checksum, loaded safely and validated by one function) and JSON files;
  - the latency measurement and the latency predictor's file (latency.py makes both, search.py uses both);
  - the lock that keeps a run folder to one writing process, and the handling of SIGINT/SIGTERM.

    from common import load_checkpoint, save_checkpoint, lock_folder, releases_locks, run
    ckpt = load_checkpoint("out/ckpt.pt")         # a checked dict, or a one-line `error: ...` and exit
    lock_folder("out")                            # or `error: out is being written by process 1234 ...`

Every problem is one line `error: ...` (SystemExit), never a traceback.
"""

import ast
import base64
import fcntl
import hashlib
import json
import os
import platform
import re
import signal
import sys
import time
import typing
from dataclasses import fields
from functools import wraps
from types import UnionType
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sacrebleu.metrics import BLEU

import mos
from data.batching import TokenBatcher, atomic_open, collate, load_corpus, make_toy_corpus, remove_bpe
from mos import EOS, FEATURE_NAMES, PAD, ArchConfig, SuperTransformer, Transformer

ROOT = Path(__file__).resolve().parent

# -----------------------------------------------------------------------------
# Settings: --key=value onto a dataclass


def split_args(argv):
    """['--key=value', ...] -> [(key, value text), ...]; anything else is a one-line error."""
    for arg in argv:
        if not (arg.startswith("--") and "=" in arg):
            raise SystemExit(f"error: bad argument {arg!r}; use --key=value")
    return [tuple(arg[2:].split("=", 1)) for arg in argv]


def apply_overrides(cfg, pairs):
    """Set each (key, text) on dataclass instance cfg: the text is read as a Python literal (a bare word is a
    string, a list fills a tuple field) and must match the field's type (`bool | None` also takes None)."""
    kinds = {f.name: f.type for f in fields(cfg)}
    for key, text in pairs:
        if key not in kinds:
            raise SystemExit(f"error: unknown setting --{key}; settings are {list(kinds)}")
        kind, optional = field_kind(kinds[key])
        value = literal_or_word(text)
        if kind is tuple and isinstance(value, str) and text.startswith("[") and text.endswith("]"):
            value = [literal_or_word(item.strip()) for item in text[1:-1].split(",") if item.strip()]  # [a.json,b]
        if kind is bool and text.lower() in ("true", "false"):
            value = text.lower() == "true"
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if kind is tuple and isinstance(value, list):
            value = tuple(value)
        if type(value) is not kind and not (optional and value is None):
            raise SystemExit(f"error: --{key}={text} should be a {kind.__name__}" + (" or None" if optional else ""))
        setattr(cfg, key, value)
    return cfg


def literal_or_word(text: str):
    """A Python literal (3, 1.5, 'x', [1]) if the text is one, else the text itself as a string."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def field_kind(annotation):
    """(type, whether None is allowed) of a settings field: `bool | None` -> (bool, True), int -> (int, False)."""
    if isinstance(annotation, UnionType) and type(None) in typing.get_args(annotation):
        return next(t for t in typing.get_args(annotation) if t is not type(None)), True
    return annotation, False


def parse_settings(cls, argv, command_field=None, presets=None):
    """The settings of dataclass `cls` from argv: a first bare word sets `command_field` (latency.py's command);
    with `presets` (name -> dict of the values that differ from cls's defaults), --preset=NAME is applied first;
    then every --key=value on top. Lists become tuples, so `--budgets=[60,80]` fills a tuple field."""
    cfg = cls()
    if command_field and argv and not argv[0].startswith("--"):
        setattr(cfg, command_field, argv[0])
        argv = argv[1:]
    pairs = split_args(argv)
    if presets is not None:
        preset = dict(pairs).get("preset", cfg.preset)
        if preset not in presets:
            raise SystemExit(f"error: unknown preset {preset!r}; choose one of {list(presets)}")
        cfg = cls(**{**presets[preset], "preset": preset})
    return apply_overrides(cfg, pairs)


def check_same(stored: dict, cfg, keys, path):
    """Refuse settings given on the command line that contradict those a checkpoint was made with, naming each."""
    norm = lambda v: json.loads(json.dumps(v))  # tuples and lists compare equal
    clashes = [f"--{k}={getattr(cfg, k)} (it has {stored.get(k)})" for k in keys
               if k in stored and norm(getattr(cfg, k)) != norm(stored[k])]
    if clashes:
        raise SystemExit(f"error: checkpoint {path} was made with other settings than {', '.join(clashes)}; "
                         f"drop these flags (the checkpoint's own are used) or use another checkpoint/--out_dir")


# -----------------------------------------------------------------------------
# Data and arch files


def load_data(data: str, data_dir: str = "", data_source: str = "", seed: int = 0):
    """The corpus `data` (multi30k | iwslt14 | toy), from data_dir (default data/<data>), preparing Multi30k or
    IWSLT14 first from data_source (a folder, URL or tarball; default: the public download) if it is missing."""
    if data == "toy":
        return make_toy_corpus(seed=seed)
    folder = Path(data_dir or ROOT / "data" / data)
    if not (folder / "summary.json").exists():
        from data.prepare import DataError, prepare_iwslt14, prepare_multi30k
        prepare = {"multi30k": prepare_multi30k, "iwslt14": prepare_iwslt14}[data]
        print(f"{folder} is not prepared yet: running data/prepare.py {data}")
        try:
            prepare(source=data_source or None, out=folder)
        except DataError as e:
            raise SystemExit(f"error: {e} (from train.py: pass --data_source=PATH, e.g. "
                             f"--data_source=../shared/data/multi30k/tok)")
    try:
        return load_corpus(folder)
    except Exception as e:  # a missing, empty, truncated or non-UTF-8 file of the prepared folder
        raise SystemExit(f"error: cannot read the prepared corpus in {folder} ({brief(e)}); prepare it again with "
                         f"data/prepare.py --force")


def check_vocab(ckpt, corpus, path):
    """Refuse a checkpoint trained with other vocabularies than this corpus's."""
    if ckpt["vocab"]["src"] != corpus.src_vocab.itos or ckpt["vocab"]["tgt"] != corpus.tgt_vocab.itos:
        raise SystemExit(f"error: checkpoint {path} was trained with other vocabularies than data "
                         f"{corpus.name!r}; pass the --data/--data_dir it was trained on")


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


# -----------------------------------------------------------------------------
# Loss, translation and BLEU


def token_loss(logits, tgt_out, label_smoothing, soft_targets=None):
    """Summed label-smoothed cross-entropy over the non-pad target tokens (nats); with soft_targets (B, T, V),
    the cross-entropy against that distribution instead (in-place distillation)."""
    logits = logits.float().flatten(0, 1)  # (B, T, V) -> (B*T, V)
    mask = tgt_out.flatten() != PAD
    if soft_targets is not None:
        return -(soft_targets.flatten(0, 1)[mask] * logits[mask].log_softmax(-1)).sum()
    return F.cross_entropy(logits, tgt_out.flatten(), ignore_index=PAD, label_smoothing=label_smoothing,
                           reduction="sum")


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


def split_batches(corpus, split, max_tokens, device, n=None):
    """The first n sentence pairs of a split (all if None), each once, as (src, tgt_in, tgt_out) batches of about
    max_tokens, in a fixed order: train.py's validation and test loss, search.py's fixed fitness subset."""
    src, tgt = (side[:n] for side in corpus.splits[split])
    batcher = TokenBatcher([len(s) for s in src], [len(t) for t in tgt], max_tokens, shuffle=False)
    return [tuple(x.to(device) for x in collate(src, tgt, idx)) for idx in batcher.batches(0)]


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


def evaluate(model, corpus, split, device, max_tokens, n_bleu=0, beam=5, lenpen=1.0, bf16=False,
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
            with atomic_open(hyps_path) as f:
                f.write("".join(line + "\n" for line in text))
        result["bleu"], result["bleu_signature"] = bleu_score(text, refs)
        if compound_split:
            result["bleu_compound_split"] = bleu_score(text, refs, compound_split=True)[0]
    return result


# -----------------------------------------------------------------------------
# Latency: the one measurement (latency.py's datasets, search.py's candidates) and the predictor's file


SRC_LEN = TGT_LEN = 23  # HAT: the mean IWSLT sentence length (30 for WMT)
BEAM = 5  # fairseq's default beam, which HAT's latency runs (and MoS's gold latency) use
PROTOCOLS = ("beam", "hat")  # what is timed: the real beam search (deployed) | HAT's model-only decoder steps
FILLER = mos.UNK + 1  # any ordinary token id fills the dummy sentence: latency does not depend on which one
TRIM = 0.1  # HAT's statistic drops the fastest and the slowest 10% of the runs


@torch.inference_mode()
def measure_latency(model: Transformer, src_len=SRC_LEN, tgt_len=TGT_LEN, beam=BEAM, warmup=20, iters=50,
                    device="cpu", threads=2, protocol="beam") -> dict:
    """Latency of a plain (extracted) Transformer in ms on one sentence of src_len tokens: the real beam search
    forced to tgt_len steps (protocol 'beam'), or HAT's encoder once plus tgt_len cached decoder steps over `beam`
    hypotheses (protocol 'hat'). Returns the median, HAT's trimmed mean, the spread and the protocol."""
    if protocol not in PROTOCOLS:
        raise SystemExit(f"error: --protocol={protocol}; choose one of {PROTOCOLS}")
    device, old_threads = torch.device(device), torch.get_num_threads()
    torch.set_num_threads(threads)  # thread count changes CPU latency ~2x (README, Latency): fix it, record it
    model = model.to(device).eval()  # HAT leaves dropout on; we time what would be deployed
    src = torch.full((1, src_len), FILLER, device=device)  # (1, S) one sentence, no padding
    src[0, -1] = EOS
    token = torch.full((beam, 1), FILLER, device=device)  # (K, 1) the newest token of every hypothesis
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)  # GPU kernels run asynchronously

    def run():
        """One timed unit; returns (encoder ms, total ms)."""
        sync()
        t0 = time.perf_counter()
        enc_outs, src_mask = model.encode(src)
        sync()
        t1 = time.perf_counter()
        if protocol == "beam":  # the deployed call (it encodes again): exactly tgt_len steps, EOS forced at the last
            mos.beam_search(model, src, beam=beam, max_len_a=0, max_len_b=tgt_len, min_len=tgt_len - 1)
            sync()
            return (t1 - t0) * 1e3, (time.perf_counter() - t1) * 1e3
        enc_outs = [m.expand(beam, -1, -1) for m in enc_outs]  # (1, S, C) -> (K, S, C): the beam's copies
        src_mask, cache = src_mask.expand(beam, -1, -1, -1), {}
        for _ in range(tgt_len):  # only the newest position is computed; keys/values of earlier ones are cached
            model.decode(token, enc_outs, src_mask, cache)  # (K, 1, V), the output projection included
        sync()
        return (t1 - t0) * 1e3, (time.perf_counter() - t0) * 1e3

    try:
        for _ in range(warmup):  # first calls build oneDNN primitives and fill the allocator's caches
            run()
        encoder, total = (np.array(x) for x in zip(*[run() for _ in range(iters)]))
    finally:
        torch.set_num_threads(old_threads)
    k = int(TRIM * iters)
    q1, q3 = np.percentile(total, [25, 75])
    return dict(median_ms=float(np.median(total)), trimmed_mean_ms=float(np.sort(total)[k:iters - k].mean()),
                iqr_ms=float(q3 - q1), std_ms=float(total.std()), min_ms=float(total.min()),
                encoder_ms=float(np.median(encoder)), iters=iters, threads=threads, device=str(device),
                src_len=src_len, tgt_len=tgt_len, beam=beam, protocol=protocol)


BUSY_LOAD = 0.5  # runnable processes beyond our own threads (1-minute load average) that make a figure suspect
DRIFT = 0.10  # the reference subnet's spread over rounds above which the machine changed during a measurement


def machine() -> str:
    """The CPU (or GPU) every latency figure was measured on, in words."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")),
                platform.processor() or platform.machine())
    simd = "AVX-512" if "avx512f" in info else "AVX2" if "avx2" in info else "no AVX2"
    return f"{name}, {simd}, {os.cpu_count()} cores"


def machine_state(threads: int) -> dict:
    """The conditions of a latency measurement: the machine, the 1-minute load average, the cores, and `others`, the
    load beyond the `threads` this measurement keeps busy itself (an estimate: the average lags by about a minute)."""
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return dict(machine=machine(), load_1min=round(load, 2), cores=os.cpu_count(),
                others=round(max(0.0, load - threads), 2), time=time.strftime("%Y-%m-%d %H:%M:%S"))


def busy_warning(before: dict, after: dict, threads: int):
    """A warning (text) if other work loaded the cores between two machine_state()s, else None."""
    if max(before["others"], after["others"]) > BUSY_LOAD:
        return (f"other work loads the cores (load {before['load_1min']} before, {after['load_1min']} after, "
                f"{threads} threads of ours): trust ratios to a reference measured alongside more than the ms")
    return None


def spread(values) -> float:
    """(max - min) / median: how far repeated figures of one thing disagree."""
    return float((max(values) - min(values)) / np.median(values))


def measure_interleaved(models: dict, reference: str, rounds=5, warmup=20, iters=20, measure=None, log=print,
                        **protocol) -> dict:
    """Latency of several plain models measured side by side, so that a busy or drifting machine hits them all
    alike: after one warm-up each, `rounds` round-robin passes time every model once (`iters` runs, median), the
    reference model first. Per model: the median over rounds of its ms and of its ratio to the same round's
    reference, and their spreads ((max - min) / median). Warns when other work loads the cores or the reference
    drifts by more than DRIFT. `measure` is measure_latency unless a test passes a fake timer."""
    measure = measure or measure_latency
    threads = protocol.get("threads", 2)
    before = machine_state(threads)
    if reference not in models:
        raise SystemExit(f"error: reference {reference!r} is not one of the models {list(models)}")
    order = [reference] + [name for name in models if name != reference]
    for name in order:  # build oneDNN primitives and fill caches before any timed round
        measure(models[name], warmup=warmup, iters=1, **protocol)
    ms = {name: [] for name in order}  # name -> per-round median ms
    for _ in range(rounds):
        for name in order:
            ms[name].append(measure(models[name], warmup=1, iters=iters, **protocol)["median_ms"])
    after = machine_state(threads)
    results = {}
    for name in order:
        ratio = [m / r for m, r in zip(ms[name], ms[reference])]  # (rounds,) relative to the same round
        results[name] = dict(median_ms=float(np.median(ms[name])), spread=spread(ms[name]), rounds_ms=ms[name],
                             ratio_to_reference=float(np.median(ratio)), ratio_spread=spread(ratio))
    warnings = [busy] if (busy := busy_warning(before, after, threads)) else []
    if results[reference]["spread"] > DRIFT:
        warnings.append(f"the reference {reference!r} varied by {results[reference]['spread']:.0%} over {rounds} "
                        f"rounds: the machine's state changed during the measurement")
    for w in warnings:
        log(f"warning: {w}")
    return dict(reference=reference, rounds=rounds, iters=iters, before=before, after=after, warnings=warnings,
                models=results, protocol={k: str(v) for k, v in protocol.items()})


def predict(predictor: dict, X) -> np.ndarray:
    """Latency (ms) of feature rows X (n, 10) from a fit_linear/fit_mlp dict, with numpy alone."""
    X = np.atleast_2d(np.asarray(X, dtype=np.float64))
    if predictor["kind"] == "linear":
        return X @ np.asarray(predictor["weight"]) + predictor["bias"]
    h = X / np.asarray(predictor["x_scale"])
    for i, layer in enumerate(predictor["layers"]):
        h = h @ np.asarray(layer["weight"]).T + np.asarray(layer["bias"])  # (n, in) -> (n, out)
        h = np.maximum(h, 0) if i < len(predictor["layers"]) - 1 else h
    return h[:, 0] * predictor["y_scale"]


def encode_array(a: np.ndarray) -> dict:
    """A float array as JSON: float32 bytes in base64 (HAT's MLP has 485K weights: 2.6 MB, not 9 MB of digits)."""
    return {"shape": list(a.shape), "float32_base64": base64.b64encode(a.astype("<f4").tobytes()).decode()}


def decode_array(d: dict) -> np.ndarray:
    """The inverse of encode_array."""
    return np.frombuffer(base64.b64decode(d["float32_base64"]), dtype="<f4").reshape(d["shape"]).astype(np.float64)


def load_predictor(path) -> dict:
    """A predictor JSON written by `fit`, with its weights as numpy arrays so that predict() is fast; anything else
    is a one-line error."""
    predictor = read_json(path, "latency predictor")
    try:
        for layer in predictor.get("layers", []):
            layer["weight"], layer["bias"] = decode_array(layer["weight"]), decode_array(layer["bias"])
        assert isinstance(predictor["space"], str) and np.isfinite(predict(predictor, np.ones(len(FEATURE_NAMES))))
    except Exception as e:  # not a dict, missing or malformed entries, weights of the wrong sizes
        raise SystemExit(f"error: latency predictor {path} is not one `python latency.py fit` wrote "
                         f"({brief(e, 100)})")
    return predictor



# -----------------------------------------------------------------------------
# JSON files


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


# -----------------------------------------------------------------------------
# Models from checkpoints


def build_supernet(args: dict) -> SuperTransformer:
    """A SuperTransformer from its init_args() dict (as stored in checkpoints)."""
    return SuperTransformer(**{**args, "space": mos.SearchSpace.from_dict(args["space"])})


def build_standalone(args: dict) -> Transformer:
    """A plain Transformer from the standalone model_args dict stored in checkpoints."""
    space, arch = mos.SearchSpace.from_dict(args["space"]), ArchConfig.from_dict(args["arch"])
    return Transformer(arch, args["src_vocab"], args["tgt_vocab"], space.qkv_dim,
                       mos.scaled_dropout(args["dropout"], arch, space), args["max_len"],
                       space.position_widths())  # positions as a subnet of the space has them


BUILDERS = {"supernet": build_supernet, "standalone": build_standalone}


def model_from_checkpoint(ckpt: dict):
    """Rebuild the supernet or standalone model a (checked) checkpoint holds, with its weights."""
    model = BUILDERS[ckpt["kind"]](ckpt["model_args"])
    model.load_state_dict(ckpt["model"])
    return model


# -----------------------------------------------------------------------------
# Checkpoints: save with a checksum, load safely, validate


KINDS = ("supernet", "standalone")  # what train.py writes as ckpt.pt
# the top-level entries and their types; a "snapshot" (weights only, for checkpoint averaging) has model and step
ENTRIES = dict(kind=str, model=dict, model_args=dict, config=dict, vocab=dict, step=int, optimizer=dict, data=dict,
               train_seconds=(int, float), torch_version=str, checksum=str)
REQUIRED = {"supernet": ("model", "model_args", "config", "vocab", "step"), "snapshot": ("model", "step")}
REQUIRED["standalone"] = REQUIRED["supernet"]
RESUME = ("optimizer", "data", "train_seconds")  # what --resume needs besides


def checksum(obj) -> str:
    """sha256 over a checkpoint's contents, walked in a fixed order (dict keys sorted): every tensor's dtype, shape
    and bytes, every other value's type and repr. The "checksum" entry itself is left out."""
    digest = hashlib.sha256()

    def walk(x):
        if isinstance(x, torch.Tensor):
            t = x.detach().cpu().contiguous()
            digest.update(f"tensor {t.dtype} {tuple(t.shape)}:".encode())
            digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())  # the raw bytes, any dtype (bf16 too)
        elif isinstance(x, dict):
            digest.update(f"dict {len(x)}:".encode())
            for key in sorted(x, key=repr):
                digest.update(repr(key).encode())
                walk(x[key])
        elif isinstance(x, (list, tuple)):
            digest.update(f"{type(x).__name__} {len(x)}:".encode())
            for item in x:
                walk(item)
        else:
            digest.update(f"{type(x).__name__} {x!r};".encode())
    walk({k: v for k, v in obj.items() if k != "checksum"})
    return digest.hexdigest()


def save_checkpoint(obj: dict, path: Path):
    """Write atomically (temporary file, then rename), so a crash never leaves a half-written checkpoint. A dict that
    holds a model gets a checksum of its contents, which load_checkpoint verifies."""
    if isinstance(obj, dict) and "model" in obj:
        obj = {**obj, "checksum": checksum(obj)}
    with atomic_open(path, "wb") as f:
        torch.save(obj, f)


def load_checkpoint(path, device="cpu", kinds=KINDS, resume=False) -> dict:
    """torch.load with weights_only=True (plain dicts and tensors only), then checkpoint_problem(): a file that does
    not load, or loads but is not a whole checkpoint of one of `kinds`, stops with one line naming the first problem.
    resume=True also requires what a resumed run needs (optimizer state, data position)."""
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except FileNotFoundError:
        raise SystemExit(f"error: checkpoint {path} does not exist")
    except IsADirectoryError:
        raise SystemExit(f"error: checkpoint {path} is a folder; give the ckpt.pt file in it")
    except Exception as e:  # truncated, corrupted, or carrying pickled objects
        raise SystemExit(f"error: cannot load checkpoint {path} safely ({brief(e, 200)}); it is corrupted, "
                         f"truncated, or not a mos checkpoint")
    problem = checkpoint_problem(ckpt, kinds, resume)
    if problem:
        raise SystemExit(f"error: checkpoint {path} {problem}")
    if "checksum" not in ckpt:
        print(f"warning: checkpoint {path} has no checksum (saved before checksums were added?): its weights "
              f"cannot be checked for corruption", file=sys.stderr)
    return ckpt


def checkpoint_problem(ckpt, kinds=KINDS, resume=False):
    """The first thing wrong with a loaded checkpoint (a phrase that follows "checkpoint PATH"), or None if it is a
    whole one of `kinds`: its entries and their types, the checksum, weights whose names and shapes are those of the
    model its model_args describe, vocabularies of the model's sizes, settings that TrainConfig knows, finite
    weights and optimizer state of the model's shapes."""
    if not isinstance(ckpt, dict):
        return f"holds a {type(ckpt).__name__}, not a mos checkpoint (a dict of model weights and settings)"
    kind = ckpt.get("kind")
    if not isinstance(kind, str):
        return "has no 'kind' entry (supernet | standalone); it is not a mos checkpoint"
    if kind not in kinds:
        return f"is of kind {kind!r}; this needs one of {list(kinds)}"
    for key in REQUIRED[kind] + (RESUME if resume else ()):
        if key not in ckpt:
            return f"has no {key!r} entry; it is not a whole mos checkpoint"
    for key, types in ENTRIES.items():
        if key in ckpt and (not isinstance(ckpt[key], types) or isinstance(ckpt[key], bool)):
            return f"entry {key!r} is a {type(ckpt[key]).__name__}, not a {getattr(types, '__name__', 'number')}"
    if ckpt["step"] < 0:
        return f"has step {ckpt['step']} < 0"
    weights = ckpt["model"]
    bad = next((k for k, v in weights.items() if not (isinstance(k, str) and isinstance(v, torch.Tensor))), None)
    if bad is not None:
        return f"model entry {bad!r} is not a named tensor"
    if "checksum" in ckpt and checksum(ckpt) != ckpt["checksum"]:
        return "does not match the checksum saved in it: the file was corrupted (or edited) after it was written"
    if kind != "snapshot":
        problem = model_problem(ckpt, kind)
        if problem:
            return problem
    nonfinite = next((k for k, v in weights.items() if v.is_floating_point() and not torch.isfinite(v).all()), None)
    if nonfinite is not None:
        return f"has non-finite values (NaN or inf) in weight {nonfinite!r}"
    return None


def model_problem(ckpt, kind):
    """checkpoint_problem's part that needs the model: model_args that build one (on the meta device: shapes
    only), weights with its names and shapes, vocabularies of its sizes, known settings, the optimizer state."""
    try:
        with torch.device("meta"):
            model = BUILDERS[kind](ckpt["model_args"])
    except Exception as e:  # anything: a missing key, a wrong type, a space nothing can be built from
        return f"has model_args that describe no {kind} model ({brief(e)})"
    expected, weights = model.state_dict(), ckpt["model"]
    missing, unknown = [k for k in expected if k not in weights], [k for k in weights if k not in expected]
    if missing or unknown:
        return (f"has weights that do not fit its model_args: {len(missing)} missing (first {missing[:1]}), "
                f"{len(unknown)} unknown (first {unknown[:1]})")
    for name, want in expected.items():
        got = weights[name]
        if got.shape != want.shape or got.is_floating_point() != want.is_floating_point():
            return f"has weight {name!r} of shape {list(got.shape)} ({got.dtype}); its model_args need " \
                   f"{list(want.shape)} ({want.dtype})"
    vocab = ckpt["vocab"]
    for side in ("src", "tgt"):
        words = vocab.get(side)
        if not (isinstance(words, list) and all(isinstance(w, str) for w in words)):
            return f"has no {side} vocabulary (vocab[{side!r}] must be a list of tokens)"
        if len(words) != ckpt["model_args"][f"{side}_vocab"]:
            return f"has a {side} vocabulary of {len(words)} tokens for a model of " \
                   f"{ckpt['model_args'][f'{side}_vocab']}"
    from train import TrainConfig  # train imports this module, so not at the top
    types = {f.name: field_kind(f.type)[0] for f in fields(TrainConfig)}  # a stored config has no None: bf16 is
    for key, value in ckpt["config"].items():  # resolved when the run starts
        if key not in types:
            return f"has an unknown setting {key!r} in its config"
        if not (type(value) is types[key] or (types[key] is float and type(value) is int)):
            return f"has setting {key}={value!r} in its config, which should be a {types[key].__name__}"
    return optimizer_problem(ckpt, list(model.parameters()))


def optimizer_problem(ckpt, params):
    """The optimizer state (if any) must belong to these parameters: one entry each, tensors of their shapes, finite;
    the data position must be two counts."""
    if "data" in ckpt and not all(isinstance(ckpt["data"].get(k), int) and ckpt["data"][k] >= 0
                                  for k in ("epoch", "batch")):
        return "has a data position that is not {'epoch': int, 'batch': int}"
    if "optimizer" not in ckpt:
        return None
    opt = ckpt["optimizer"]
    groups, state = opt.get("param_groups"), opt.get("state")
    if not (isinstance(groups, list) and all(isinstance(g, dict) and isinstance(g.get("params"), list)
                                             for g in groups) and isinstance(state, dict)):
        return "has an optimizer entry that is not an optimizer state_dict (state, param_groups)"
    ids = [i for g in groups for i in g["params"]]
    if ids != list(range(len(params))):
        return f"has optimizer state for {len(ids)} parameters; the model has {len(params)}"
    for i, entry in state.items():
        if i not in ids or not isinstance(entry, dict):
            return f"has optimizer state for an unknown parameter {i!r}"
        for name, value in entry.items():
            if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape != params[i].shape:
                return f"has optimizer state {name!r} of shape {list(value.shape)} for a parameter of " \
                       f"{list(params[i].shape)}"
            if isinstance(value, torch.Tensor) and value.is_floating_point() and not torch.isfinite(value).all():
                return f"has non-finite optimizer state {name!r} of parameter {i}"
    return None


# -----------------------------------------------------------------------------
# One writer per run folder


_held = {}  # lock file -> [its open file, how many holders in this process]
_scopes = []  # per running @releases_locks call: the lock files it took


def writable_folder(folder) -> Path:
    """Create `folder` (and its parents) if needed; a one-line error if it cannot be (a file, no permission)."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if not os.access(folder, os.W_OK):
            raise PermissionError("not writable")
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: cannot write to folder {folder} ({getattr(e, 'strerror', None) or e}); "
                         f"give another one")
    return folder


def lock_folder(folder, create=True) -> Path:
    """Take the exclusive lock folder/.lock for this process (created with the folder unless create=False). It is
    an OS lock (flock), so it ends with the process however it ends: a SIGKILL never leaves a stale lock. A second
    writer, in another process, stops with a one-line error naming the pid of the one that holds it."""
    folder = Path(folder)
    if not create and not folder.is_dir():
        raise SystemExit(f"error: {folder} does not exist (or is not a folder)")
    return _lock(writable_folder(folder) / ".lock", folder)


def lock_file(path) -> Path:
    """The same lock for a single output file: `path`.lock beside it."""
    path = Path(path)
    return _lock(writable_folder(path.parent) / (path.name + ".lock"), path)


def _lock(lock_path: Path, target: Path) -> Path:
    """flock(LOCK_EX | LOCK_NB) on lock_path, re-entrant within this process; the holder's pid is written into it."""
    key = str(lock_path.resolve())
    if key not in _held:
        try:
            f = open(lock_path, "a+")
        except OSError as e:
            raise SystemExit(f"error: cannot write to {target} ({e.strerror}); give another folder")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)  # never waits, so two commands can never deadlock
        except BlockingIOError:
            f.seek(0)
            pid = f.read().strip() or "?"
            f.close()
            raise SystemExit(f"error: {target} is being written by process {pid} (it holds {lock_path}); wait for it "
                             f"to end or write elsewhere")
        f.truncate(0)
        f.write(f"{os.getpid()}\n")
        f.flush()
        _held[key] = [f, 0]
    _held[key][1] += 1
    if _scopes:
        _scopes[-1].append(key)
    return lock_path


def releases_locks(main):
    """Decorator for a command's main(): the locks it takes are released when it returns or fails (the ones its
    caller holds stay held), so reproduce.py and tests can run commands in-process one after another."""
    @wraps(main)
    def wrapper(*args, **kwargs):
        _scopes.append([])
        try:
            return main(*args, **kwargs)
        finally:
            for key in _scopes.pop():
                _held[key][1] -= 1
                if _held[key][1] == 0:
                    _held.pop(key)[0].close()  # closing the file releases the flock
    return wrapper


# -----------------------------------------------------------------------------
# SIGINT (Ctrl-C) and SIGTERM (schedulers: SLURM, Kubernetes, systemd send it before SIGKILL)


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
received = []  # every stop signal this process caught, in order


class Stopped(BaseException):
    """A stop signal arrived (a BaseException, like KeyboardInterrupt: `except Exception` does not swallow it)."""

    def __init__(self, signum):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise_stopped(signum, frame):
    received.append(signum)
    raise Stopped(signum)


def defer_stop_signals(noted: list):
    """From now on SIGINT and SIGTERM only append their number to `noted` (train.py looks at it after every step,
    saves and stops). Returns the function that puts the previous handlers back."""
    def note(signum, frame):
        received.append(signum)
        noted.append(signum)
    previous = {s: signal.signal(s, note) for s in STOP_SIGNALS}
    return lambda: [signal.signal(s, handler) for s, handler in previous.items()]


def run(main, resume_hint="rerun the same command to continue"):
    """A script's entry point: main(sys.argv[1:]) with SIGINT and SIGTERM raising Stopped wherever it is (train.py
    defers them in its loop). Everything finished is already on disk (atomic writes, caches, whole CSV rows), so a
    stop prints one line and exits with 128 + the signal's number (130 Ctrl-C, 143 SIGTERM), as a shell would."""
    for s in STOP_SIGNALS:
        signal.signal(s, _raise_stopped)
    try:
        main(sys.argv[1:])
    except Stopped as e:
        print(f"stopped by {signal.Signals(e.signum).name}; {resume_hint}", file=sys.stderr)
        sys.exit(128 + e.signum)


# -----------------------------------------------------------------------------
# Checks every command makes alike


def check_settings(values: dict, limits=None, choices=None):
    """A one-line error for the first setting (of dict `values`) outside its (low, high) `limits` (None: no bound)
    or not one of its `choices`."""
    for key, (low, high) in (limits or {}).items():
        if (low is not None and values[key] < low) or (high is not None and values[key] > high):
            bound = f">= {low}" if high is None else f"<= {high}" if low is None else f"in [{low}, {high}]"
            raise SystemExit(f"error: --{key}={values[key]} must be {bound}")
    for key, allowed in (choices or {}).items():
        if values[key] not in allowed:
            raise SystemExit(f"error: --{key}={values[key]}; choose one of {list(allowed)}")


def check_budgets(budgets):
    """Latency budgets (search.py, reproduce.py) are a non-empty list of positive numbers of ms."""
    if not budgets or not all(type(b) in (int, float) and b > 0 for b in budgets):
        raise SystemExit(f"error: --budgets={list(budgets)}; give a list of positive numbers (ms), e.g. [18,27]")


def get_device(name: str, auto=False) -> torch.device:
    """cpu | cuda | cuda:N (and auto: cuda if present): a torch.device, or one line saying why not here."""
    if auto and name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise SystemExit(f"error: --device={name}; use cpu or cuda" + (" or auto" if auto else ""))
    if device.type not in ("cpu", "cuda"):
        raise SystemExit(f"error: --device={name}; use cpu or cuda" + (" or auto" if auto else ""))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"error: --device={name} but torch sees no CUDA GPU here; use --device=cpu")
    return device


def read_json(path, what="file"):
    """Parsed JSON of `path`, or a one-line error (missing, unreadable, not UTF-8, not JSON, nested too deeply)."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise SystemExit(f"error: cannot read {what} {path} ({brief(e)})")


def brief(e: Exception, limit=150) -> str:
    """An exception as a short one-line text for an error message."""
    return f"{type(e).__name__}: {' '.join(str(e).split())[:limit]}"
