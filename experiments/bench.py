"""
Benchmarks, measured side by side in one run (nanoGPT's bench.py, grown a little). Prints a table and writes
experiments/results/bench.json (the committed evidence; give --out=out_bench/bench.json for a trial run), with the
CPU model and its avx2/avx512f/avx512_bf16/amx_bf16 flags:
  0. a peer: torch's own nn.Transformer at the largest subnet's size, trained on the same batch, fp32 and bf16,
     against mos's extracted subnet and its supernet path; and the precision train.py picks when --bf16 is unset;
  1. training throughput (target tokens/s) of the CPU preset's sandwich step, and model FLOPs utilisation against
     this machine's own matmul peak measured in the same run (fp32, and bf16);
  2. step time of layer-wise and neuron-wise MoS against plain weight sharing, same arch and batch (ratio);
  3. decoding: beam search with the cache against without, sentences/s on a 1,000-sentence set (30 decoder steps
     forced, so an untrained model's early EOS cannot shorten it), and the cached search in bf16; forward
     latency at batch 1 of the extracted subnet against the supernet path (routing and mixing on every call);
  4. peak memory of a training step for the largest subnet;
  5. time spent waiting on data per step.

    python experiments/bench.py            # CPU preset on Multi30k (prepared by train.py / data/prepare.py)
    python experiments/bench.py --data=toy --space=tiny --out=out_bench/bench.json   # the toy task, a trial output
    python -m experiments.bench --data=toy --space=tiny --out=out_bench/bench.json   # the same, as a module
    python experiments/bench.py precision --fp32=out/ckpt.pt --bf16=out_bf16/ckpt.pt   # BLEU evidence for bf16

`precision` writes experiments/results/bench_precision.json (--out).
"""

import random
import statistics
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `python experiments/bench.py` finds the core
import mos  # noqa: E402
from data.batching import TokenBatcher, collate  # noqa: E402
from data.corpus import remove_bpe  # noqa: E402
from runs.files import writable_folder, write_json  # noqa: E402
from data.prepare import load_data  # noqa: E402
from mos import SPACES, SuperTransformer  # noqa: E402
from runs.settings import check_settings, get_device, parse_settings  # noqa: E402
from runs.loop import faster_precision  # noqa: E402
from runs.machine import fast_bf16, synchronizer  # noqa: E402
from train import (TrainConfig, evaluate, load_checkpoint, model_from_checkpoint, token_loss,  # noqa: E402
                   train_step, translate_ids)


@dataclass
class BenchConfig:
    """`python experiments/bench.py`: speed of the training step and of decoding."""
    data: str = "multi30k"  # multi30k | iwslt14 | toy
    space: str = "cpu"
    device: str = "auto"
    max_tokens: int = 4096  # the training batch timed
    repeats: int = 7  # interleaved repeats of every timed variant
    warmup: int = 2
    decode_sentences: int = 1000
    decode_batch: int = 64
    beam: int = 5
    out: str = "experiments/results/bench.json"
    seed: int = 0


@dataclass
class PrecisionConfig:
    """`python experiments/bench.py precision`: two supernets trained alike except for precision."""
    fp32: str = "out/ckpt.pt"
    bf16: str = "out_bf16/ckpt.pt"
    out: str = "experiments/results/bench_precision.json"
    samples: int = 1000  # paired-bootstrap resamples


@dataclass
class PrepConfig:
    """`python experiments/bench.py prep`: the Python a supernet forward spends preparing a subnet (its skeleton,
    names and shapes, and the weights cut by name), rebuilt every forward against kept per arch (SuperTransformer.plan);
    HAT's plain sharing, so that no mixture arithmetic is counted."""
    space: str = "iwslt14"
    src_vocab: int = 8848
    tgt_vocab: int = 6632
    repeats: int = 21
    out: str = "experiments/results/forward_prep.json"


@dataclass
class SaveConfig:
    """`python experiments/bench.py save`: what one ckpt.pt of a space's supernet costs to write, at its real size."""
    space: str = "iwslt14"
    src_vocab: int = 8848  # the full IWSLT14 vocabularies (fairseq's dictionaries plus 4 specials)
    tgt_vocab: int = 6632
    repeats: int = 3
    out: str = "experiments/results/save_cost.json"


def timed(fn, device):
    """Seconds one call of fn takes (the device synchronised before and after)."""
    sync = synchronizer(device)
    sync()
    t = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t


def interleaved(fns: dict, device, repeats, warmup):
    """Median seconds of each fn, timed in rounds that alternate between them, so slow drifts of the machine
    affect all of them alike (the ratios are what we trust)."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            times[k].append(timed(fn, device))
    return {k: statistics.median(v) for k, v in times.items()}


def progress(what: str, repeats: int):
    """One line as a measurement starts, so a long benchmark is never silent."""
    print(f"timing {what} ({repeats} rounds) ...", flush=True)


def matmul_peak(device, dtype, n=2048, repeats=10):
    """Achieved FLOP/s of an n x n x n matmul: the machine's practical peak for MFU."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    secs = interleaved({"mm": lambda: a @ b}, device, repeats, warmup=3)["mm"]
    return 2 * n ** 3 / secs


def train_flops(arch, space, tgt_vocab, n_src, n_tgt):
    """Matmul FLOPs of one forward+backward (3x the forward's 2 FLOPs per weight per token) of one subnet on
    n_src source and n_tgt target tokens. Embedding lookups are not matmuls; attention scores are left out
    (sentences are ~16 tokens, so they are < 2% here)."""
    Q, Ce, Cd = space.qkv_dim, arch.enc_embed_dim, arch.dec_embed_dim
    enc = sum(Ce * Q * 4 + 2 * Ce * f for f in arch.enc_ffn_dims)  # q, k, v, out + FFN, per source token
    dec = sum(Cd * Q * 4 + Cd * Q * 2 + 2 * Cd * f for f in arch.dec_ffn_dims) + Cd * tgt_vocab  # + cross q/out
    cross_kv = sum(Ce * 2 * Q * s for s in arch.dec_cross_spans)  # cross keys/values, per source token
    return 6 * ((enc + cross_kv) * n_src + dec * n_tgt)


def cpu() -> dict:
    """The CPU model and the instruction-set flags that decide fp32 and bf16 speed."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "?")
    flags = set(next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), []))
    return dict(model=name, flags=[f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags])


class Peer(nn.Module):
    """What a user might write instead of mos: torch's own nn.Transformer (post-norm, as mos) at one arch's size,
    with embeddings, sinusoidal positions, embedding dropout and an output projection, as mos's Transformer has.
    One width, head count and FFN width for every layer: the largest subnet's."""

    def __init__(self, arch, V_src, V_tgt, dropout):
        super().__init__()
        C, self.dropout = arch.enc_embed_dim, dropout
        self.src_embed, self.tgt_embed = nn.Embedding(V_src, C, padding_idx=mos.PAD), nn.Embedding(V_tgt, C, padding_idx=mos.PAD)
        self.register_buffer("pos", mos.sinusoids(1024, C))  # (L, C)
        self.core = nn.Transformer(C, arch.enc_heads[0], arch.enc_layers, arch.dec_layers, arch.enc_ffn_dims[0],
                                   dropout, batch_first=True)
        self.out = nn.Linear(C, V_tgt, bias=False)

    def forward(self, src, tgt_in):
        """Teacher-forced logits (B, T, V)."""
        scale, (S, T) = self.pos.size(1) ** 0.5, (src.size(1), tgt_in.size(1))
        x = F.dropout(self.src_embed(src) * scale + self.pos[:S], self.dropout, self.training)  # (B, S, C)
        y = F.dropout(self.tgt_embed(tgt_in) * scale + self.pos[:T], self.dropout, self.training)  # (B, T, C)
        pad = src == mos.PAD  # (B, S)
        h = self.core(x, y, tgt_mask=nn.Transformer.generate_square_subsequent_mask(T), tgt_is_causal=True,
                      src_key_padding_mask=pad, memory_key_padding_mask=pad)  # (B, T, C)
        return self.out(h)


def peak_rss_bytes():
    """Peak resident memory of this process so far (Linux VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def read_settings(cls, argv) -> dict:
    """The settings of dataclass `cls` with every --key=value of argv applied (runs.settings.parse_settings, as every
    script), as a dict; counts must be >= 1 (warmup and seed >= 0), and the output's folder writable."""
    cfg = parse_settings(cls, argv)
    check_settings(cfg, {f.name: 1 for f in fields(cls) if f.type is int and f.name not in ("warmup", "seed")},
                   {**(dict(data=("multi30k", "iwslt14", "toy")) if hasattr(cfg, "data") else {}),
                    **(dict(space=SPACES) if hasattr(cfg, "space") else {})})
    writable_folder(Path(cfg.out).parent)
    return asdict(cfg)


def main(argv):
    s = read_settings(BenchConfig, argv)
    device = get_device(s["device"], auto=True)
    torch.manual_seed(s["seed"])
    corpus = load_data(s["data"], seed=s["seed"])
    space, V_src, V_tgt = SPACES[s["space"]], len(corpus.src_vocab), len(corpus.tgt_vocab)
    src, tgt = corpus.splits["train"]
    batcher = TokenBatcher([len(x) for x in src], [len(x) for x in tgt], s["max_tokens"], seed=s["seed"])
    batch_idx = max(batcher.batches(0), key=len)  # a full batch of typical length
    batch = [x.to(device) for x in collate(src, tgt, batch_idx)]
    n_src, n_tgt = int((batch[0] != mos.PAD).sum()), int((batch[2] != mos.PAD).sum())
    report = {"cpu": cpu(), "device": str(device), "threads": torch.get_num_threads(), "torch": torch.__version__,
              "space": space.name, "data": corpus.name, "batch_sentences": len(batch_idx),
              "batch_target_tokens": n_tgt}
    print(f"{report['cpu']['model']} {' '.join(report['cpu']['flags'])} | device {device} | "
          f"{torch.get_num_threads()} threads | torch {torch.__version__} | "
          f"batch {len(batch_idx)} sentences, {n_tgt} target tokens")
    precisions = ("fp32", "bf16") if fast_bf16(device) else ("fp32",)  # emulated bf16 (~100x slower) is never timed
    report["precisions_timed"] = list(precisions)
    if len(precisions) == 1:
        print("bf16 is emulated here (no AVX-512 BF16/AMX, or a GPU without bf16): timing fp32 only")

    models = {r: SuperTransformer(space, V_src, V_tgt, num_experts=1 if r == "none" else 2, router=r).to(device)
              for r in ("none", "layer", "neuron")}
    opts = {r: torch.optim.Adam(m.parameters(), lr=1e-4, betas=(0.9, 0.98)) for r, m in models.items()}

    def step_fn(router, archs, bf16=False):
        """One training step of `archs` (gradients accumulated, one Adam update)."""
        model, opt = models[router], opts[router]
        s_, ti, to = batch

        def run():
            for arch in archs:
                with torch.autocast(device.type, torch.bfloat16, enabled=bf16):
                    logits = model(s_, ti, arch)
                (token_loss(logits, to, 0.1) / n_tgt / len(archs)).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return run

    # ---- 0. the peer: the largest subnet's training step in torch's nn.Transformer, mos's extracted subnet (a plain
    # mos.Transformer) and mos's supernet path, fp32 and bf16, one batch, interleaved
    largest = space.largest()
    peers = dict(peer=Peer(largest, V_src, V_tgt, models["neuron"].dropout).to(device),
                 subnet=models["neuron"].subnet(largest).train().to(device), supernet=models["neuron"])
    peer_opts = {k: torch.optim.Adam(m.parameters(), lr=1e-4, betas=(0.9, 0.98)) for k, m in peers.items()}

    def peer_step(name, bf16):
        """One training step of peers[name] on the batch: label-smoothed cross-entropy (torch's own for the peer)."""
        model, opt, (s_, ti, to) = peers[name], peer_opts[name], batch

        def run():
            with torch.autocast(device.type, torch.bfloat16, enabled=bf16):
                logits = model(s_, ti, largest) if name == "supernet" else model(s_, ti)  # (B, T, V)
            if name == "peer":
                loss = F.cross_entropy(logits.float().flatten(0, 1), to.flatten(), ignore_index=mos.PAD,
                                       label_smoothing=0.1, reduction="sum")
            else:
                loss = token_loss(logits, to, 0.1)
            (loss / n_tgt).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return run
    progress("0. the largest subnet's training step: torch's nn.Transformer, mos's extracted subnet, the supernet",
             s["repeats"])
    t = interleaved({f"{name}_{p}": peer_step(name, p == "bf16") for name in peers for p in precisions},
                    device, s["repeats"], s["warmup"])
    report["largest_step_seconds"] = t
    report["vs_peer"] = {f"{name}_{p}": t[f"{name}_{p}"] / t[f"peer_{p}"] for name in ("subnet", "supernet")
                         for p in precisions}
    if "bf16" in precisions:
        report["bf16_speedup"] = {name: t[f"{name}_fp32"] / t[f"{name}_bf16"] for name in peers}
    for p in precisions:
        print(f"largest subnet's step, {p}: nn.Transformer peer {t['peer_' + p] * 1e3:.0f} ms | mos extracted subnet "
              f"{t['subnet_' + p] * 1e3:.0f} ms (x{report['vs_peer']['subnet_' + p]:.2f}, target <= 1) | supernet path "
              f"{t['supernet_' + p] * 1e3:.0f} ms (x{report['vs_peer']['supernet_' + p]:.2f})")
    one_step = lambda bf16: train_step(models["neuron"], batch, [largest], TrainConfig(bf16=bf16))
    bf16, why = faster_precision(one_step, models["neuron"], batch[0].device, ddp=False)
    report["default_precision"] = dict(bf16=bf16, reason=why)
    print(f"train.py's default here: {why}")

    # ---- 2. MoS overhead: the same arch and batch, plain sharing vs layer-wise vs neuron-wise
    progress("2. MoS overhead: plain sharing, layer-wise and neuron-wise, largest and smallest subnet", s["repeats"])
    for name, arch in (("largest", space.largest()), ("smallest", space.smallest())):
        t = interleaved({r: step_fn(r, [arch]) for r in models}, device, s["repeats"], s["warmup"])
        report[f"step_seconds_{name}"] = t
        report[f"mos_overhead_{name}"] = {r: t[r] / t["none"] for r in ("layer", "neuron")}
        print(f"train step, {name} subnet: plain {t['none'] * 1e3:.0f} ms | layer-wise {t['layer'] * 1e3:.0f} ms "
              f"(x{t['layer'] / t['none']:.3f}) | neuron-wise {t['neuron'] * 1e3:.0f} ms (x{t['neuron'] / t['none']:.3f})"
              f"  target <= x1.10")

    # ---- 1. throughput and MFU of the CPU preset's sandwich step (neuron-wise MoS), fp32 and bf16, interleaved
    sandwich = [space.largest(), space.smallest(), space.sample(random.Random(s["seed"]))]
    flops = sum(train_flops(a, space, V_tgt, n_src, n_tgt) for a in sandwich)
    progress("1. the sandwich step's throughput and MFU", s["repeats"])
    t = interleaved({p: step_fn("neuron", sandwich, p == "bf16") for p in precisions}, device, s["repeats"],
                    s["warmup"])
    for dtype, secs in t.items():
        peak = matmul_peak(device, torch.float32 if dtype == "fp32" else torch.bfloat16)
        report[f"sandwich_{dtype}"] = dict(step_seconds=secs, target_tokens_per_s=n_tgt / secs,
                                           model_tflops=flops / secs / 1e12, peak_matmul_tflops=peak / 1e12,
                                           mfu=flops / secs / peak)
        print(f"sandwich step {dtype}: {secs * 1e3:.0f} ms | {n_tgt / secs:.0f} target tok/s | "
              f"{flops / secs / 1e12:.3f} TFLOP/s of a {peak / 1e12:.3f} TFLOP/s matmul peak = MFU {flops / secs / peak:.1%}")
    if "bf16" in precisions:
        report["sandwich_bf16_speedup"] = t["fp32"] / t["bf16"]
        report["default_precision"]["faster_in_sandwich"] = report["default_precision"]["bf16"] == (t["bf16"] <
                                                                                                  t["fp32"])
        print(f"sandwich step: bf16 x{t['fp32'] / t['bf16']:.2f} faster than fp32 (target >= 1.6)")

    # ---- 5. data waiting: building the batches (packing + collate) against the step itself
    t_data = statistics.median(timed(lambda: collate(src, tgt, batch_idx), device) for _ in range(20))
    t_epoch = timed(lambda: batcher.batches(1), device) / len(batcher)  # packing cost spread over an epoch
    step_s = report["sandwich_fp32"]["step_seconds"]
    report["data_wait"] = dict(collate_seconds=t_data, packing_seconds_per_step=t_epoch,
                               fraction_of_step=(t_data + t_epoch) / step_s)
    print(f"data: collate {t_data * 1e3:.2f} ms + packing {t_epoch * 1e3:.2f} ms per step "
          f"= {(t_data + t_epoch) / step_s:.2%} of a step (target < 5%)")

    # ---- 4. peak memory of a training step of the largest subnet
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        step_fn("neuron", [largest])()
        peak = torch.cuda.max_memory_allocated()
    else:
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak-RSS counter (Linux)
        step_fn("neuron", [largest])()
        peak = peak_rss_bytes()
    report["peak_memory_bytes_largest_step"] = peak
    print(f"peak memory, largest-subnet training step: {peak / 2 ** 20:.0f} MiB "
          f"({'CUDA allocated' if device.type == 'cuda' else 'process RSS incl. all three test supernets'})")

    # ---- 3. decoding: cached vs uncached beam search; extracted subnet vs supernet path at batch 1
    supernet = models["neuron"].eval()
    subnet = supernet.subnet(largest).eval()
    test_src = corpus.splits["test"][0][: s["decode_sentences"]]
    order = sorted(range(len(test_src)), key=lambda i: len(test_src[i]))
    chunks = [collate(test_src, test_src, order[k:k + s["decode_batch"]])[0].to(device)
              for k in range(0, len(order), s["decode_batch"])]
    fixed = dict(beam=s["beam"], max_len_a=0.0, max_len_b=30, min_len=29)  # exactly 30 decoder steps (mos.beam_search)

    def decode_all(cache, bf16=False):
        def run():
            with torch.autocast(device.type, torch.bfloat16, enabled=bf16):
                return [mos.beam_search(subnet, c, use_cache=cache, **fixed) for c in chunks]
        return run
    progress(f"3. decoding {len(test_src)} test sentences: cached and uncached beam search", 1)
    t = interleaved({"cached": decode_all(True), "uncached": decode_all(False),
                     **({"cached_bf16": decode_all(True, True)} if "bf16" in precisions else {})}, device, 1, 0)
    n = len(test_src)
    report["beam_search"] = dict(sentences=n, batch=s["decode_batch"], beam=s["beam"], output_tokens=30,
                                 cached_sentences_per_s=n / t["cached"], uncached_sentences_per_s=n / t["uncached"],
                                 speedup=t["uncached"] / t["cached"])
    if "cached_bf16" in t:
        report["beam_search"]["cached_bf16_sentences_per_s"] = n / t["cached_bf16"]
    print(f"beam {s['beam']}, 30 tokens, {n} sentences: cached {n / t['cached']:.1f} sent/s | uncached "
          f"{n / t['uncached']:.1f} sent/s | x{t['uncached'] / t['cached']:.2f} (target >= 3)"
          + (f" | cached in bf16 {n / t['cached_bf16']:.1f} sent/s" if "cached_bf16" in t else ""))
    one_src = torch.randint(4, V_src, (1, 23), device=device)
    one_tgt = torch.randint(4, V_tgt, (1, 23), device=device)
    with torch.inference_mode():
        t = interleaved({"subnet": lambda: subnet(one_src, one_tgt),
                         "supernet": lambda: supernet(one_src, one_tgt, largest)}, device, 50, 5)
    report["batch1_forward_ms"] = {k: v * 1e3 for k, v in t.items()}
    print(f"batch-1 forward (23 src, 23 tgt tokens), largest: subnet {t['subnet'] * 1e3:.2f} ms | supernet path "
          f"{t['supernet'] * 1e3:.2f} ms | subnet/supernet x{t['subnet'] / t['supernet']:.2f} (target <= 1)")

    out = Path(s["out"])
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out, report)
    print(f"wrote {out}")


def precision(argv):
    """`precision`: test BLEU of two supernets trained alike except for precision (same seed, data order and
    steps), each decoded in its own precision, and sacrebleu's paired bootstrap of the difference. This is the
    evidence the default precision rests on: bf16 may become the default only if its BLEU is fp32's within noise."""
    from sacrebleu.metrics import BLEU
    from sacrebleu.significance import PairedTest
    s = read_settings(PrecisionConfig, argv)
    report, hyps, device = {"settings": s}, {}, torch.device("cpu")
    for name in ("fp32", "bf16"):
        ckpt = load_checkpoint(s[name])
        cfg = ckpt["config"]  # the training run's settings: its data and precision
        if cfg["bf16"] != (name == "bf16"):
            raise SystemExit(f"error: --{name}={s[name]} was trained with bf16={cfg['bf16']}")
        corpus = load_data(cfg["data"], cfg["data_dir"], cfg.get("data_source", ""), cfg["seed"])
        supernet = model_from_checkpoint(ckpt).eval()
        report[name] = dict(ckpt=s[name], step=ckpt["step"], train_seconds=ckpt.get("train_seconds"))
        for arch in ("largest", "smallest", "middle"):
            net = supernet.subnet(getattr(supernet.space, arch)())
            t = time.perf_counter()
            report[name][arch] = evaluate(net, corpus, "test", device, cfg["max_tokens"], n_bleu=-1,
                                          bf16=cfg["bf16"])  # test loss
            ids = translate_ids(net.eval(), corpus.splits["test"][0], device, cfg["beam"], cfg["lenpen"],
                                cfg["bf16"])
            report[name][arch]["eval_seconds"] = time.perf_counter() - t
            hyps[name, arch] = [remove_bpe(corpus.tgt_vocab.decode(h)) for h in ids]
    refs = [[remove_bpe(r) for r in corpus.refs["test"]]]
    for arch in ("largest", "smallest", "middle"):
        test = PairedTest([(n, hyps[n, arch]) for n in ("fp32", "bf16")], {"BLEU": BLEU(tokenize="none", force=True)},
                          refs, test_type="bs", n_samples=s["samples"])
        signatures, scores = test()
        signature, (base, other) = signatures["BLEU"], scores["BLEU"]
        report[arch] = dict(fp32_bleu=base.score, fp32_ci95=float(base.ci), bf16_bleu=other.score,
                            bf16_ci95=float(other.ci), difference=other.score - base.score, p_value=other.p_value,
                            signature=str(signature))
        print(f"{arch}: fp32 {base.score:.2f} (+-{base.ci:.2f}) | bf16 {other.score:.2f} (+-{other.ci:.2f}) | "
              f"difference {other.score - base.score:+.2f}, paired bootstrap p = {other.p_value:.3f}")
    write_json(Path(s["out"]), report)
    print(f"wrote {s['out']}")


def forward_prep(argv):
    """`prep`: milliseconds of a forward's preparation of the largest and the smallest subnet, the plan rebuilt
    every call (as before plans were kept) and kept; the median of `repeats`, on the CPU."""
    s = read_settings(PrepConfig, argv)
    model = SuperTransformer(SPACES[s["space"]], s["src_vocab"], s["tgt_vocab"], num_experts=1, router="none")
    report = dict(cpu=cpu(), space=s["space"])
    for name in ("largest", "smallest"):
        arch = getattr(model.space, name)()
        with torch.no_grad():
            rebuilt = interleaved({"rebuilt": lambda: (model.plans.clear(), model.subnet_weights(arch)),
                                   "kept": lambda: model.subnet_weights(arch)}, torch.device("cpu"), s["repeats"], 2)
        report[name] = dict(rebuilt_ms=rebuilt["rebuilt"] * 1e3, kept_ms=rebuilt["kept"] * 1e3,
                            ratio=rebuilt["rebuilt"] / rebuilt["kept"])
        print(f"{s['space']} {name} subnet, a forward's preparation: rebuilt {report[name]['rebuilt_ms']:.2f} ms | "
              f"kept {report[name]['kept_ms']:.2f} ms | x{report[name]['ratio']:.1f} lower (target >= 5)")
    write_json(Path(s["out"]), report)


def save_cost(argv):
    """`save`: seconds to checksum and write one checkpoint of the space's neuron-wise supernet with its AdamW state
    (what train.py saves every save_interval steps), in a temporary folder; the median of `repeats`."""
    import tempfile
    from runs.checkpoints import checksum, save_checkpoint
    s = read_settings(SaveConfig, argv)
    model = SuperTransformer(SPACES[s["space"]], s["src_vocab"], s["tgt_vocab"])
    optimizer = torch.optim.AdamW(model.parameters())
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()  # the moment buffers exist, as in any saved run
    ckpt = dict(kind="supernet", model=model.state_dict(), optimizer=optimizer.state_dict(), step=1)
    hashing, saving, size = [], [], 0
    with tempfile.TemporaryDirectory() as folder:
        for _ in range(s["repeats"]):
            hashing.append(timed(lambda: checksum(ckpt), torch.device("cpu")))
            saving.append(timed(lambda: save_checkpoint(ckpt, Path(folder) / "ckpt.pt"), torch.device("cpu")))
            size = (Path(folder) / "ckpt.pt").stat().st_size
    report = dict(cpu=cpu(), space=s["space"], parameters=sum(p.numel() for p in model.parameters()), bytes=size,
                  checksum_seconds=statistics.median(hashing), save_seconds=statistics.median(saving))
    print(f"{s['space']} supernet, {report['parameters'] / 1e6:.1f}M parameters + AdamW state: {size / 1e9:.2f} GB, "
          f"checksum {report['checksum_seconds']:.2f} s, save with checksum {report['save_seconds']:.2f} s")
    write_json(Path(s["out"]), report)


if __name__ == "__main__":
    if sys.argv[1:2] in (["precision"], ["save"], ["prep"]):
        {"precision": precision, "save": save_cost, "prep": forward_prep}[sys.argv[1]](sys.argv[2:])
    else:
        main(sys.argv[1:])
