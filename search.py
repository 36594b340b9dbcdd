"""
HAT's evolutionary search for the best subnet of a trained supernet under a latency budget (HAT, section 3.3).

    python search.py --ckpt=out/ckpt.pt --budgets=[p25,p50,p75]   # percentiles of your latency dataset, predicted
    python search.py --ckpt=out/ckpt.pt --budgets=[27] --latency=measured        # 27 ms; time every candidate
    python train.py --arch=out_search/arch_27ms.json --init=out/ckpt.pt --out_dir=out_ft   # then finetune a winner

The loop, as HAT's evolution.py but on ArchConfig fields (no flat gene list): a random population that meets the
budget; every iteration scores it, keeps the best `parents`, and refills it with `mutations` mutants of random
parents and `crossovers` children of two parents. Every new subnet is accepted only if it meets the budget
(rejection sampling: a hard constraint, never a penalty), and a budget nothing meets stops with a clear error.
Fitness (`fitness`) is the supernet's validation loss (nats/token, no label smoothing) of the subnet, extracted
with its MoS mixture computed once, on a fixed subset of the valid split; latency is the predictor's
(`predicted_latency`) or a timing of the extracted subnet (`measured_latency`). Every score is cached per arch, in
memory and in out_dir/cache.json, so a killed search reruns to the same point without rescoring: an arch is
extracted once for its fitness and, with measured latency, once more to be timed. The chosen subnets are always
re-measured carefully (extracted again for each repeat); results.json puts predicted and measured latency side by
side.
With --latency=predicted the search is deterministic for a seed; measured latencies carry timing noise, so a
borderline candidate may be accepted in one run and not in another (their cache makes a resumed run agree).
"""

import math
import random
import time
from dataclasses import asdict, dataclass, fields
from functools import partial
from pathlib import Path

import torch

import mos
from data.batching import split_batches
from data.prepare import load_data
from latency import PROTOCOLS, fastest_arch, load_predictor, measure_latency, predict, read_latency_csv
from mos import ArchConfig
from runs.checkpoints import check_vocab
from runs.files import Cache, file_identity, releases_locks, write_json
from runs.folders import check_target, claim_folder
from runs.latency_files import budgets_in_ms, check_budgets, predictor_for
from runs.machine import busy_warning, machine_state
from runs.plots import plot_search
from runs.settings import check_settings, get_device, parse_settings
from runs.signals import run
from train import load_checkpoint, model_from_checkpoint, valid_loss

SCALARS = [f.name for f in fields(ArchConfig) if f.type is int]  # embedding widths and layer counts
PER_LAYER = [f.name for f in fields(ArchConfig) if f.type is tuple]  # one value per active layer

# -----------------------------------------------------------------------------
# Settings


@dataclass
class SearchConfig:
    """Every setting of the command line. Evolution: HAT's 125 = 25 parents + 50 mutants + 50 crossovers,
    mutation probability 0.3, 30 iterations (MoS: 10), scaled to a third for a 2-core CPU with the same ratios."""
    ckpt: str = "out/ckpt.pt"  # a supernet checkpoint from train.py
    out_dir: str = "out_search"
    budgets: tuple = ("p25", "p50", "p75")  # one search each: ms, or pNN: that percentile of the latencies in
    # latency_csv (latency depends on the machine and the protocol, so percentiles of your own data fit any machine)
    latency_csv: str = "out_latency/latency.csv"  # the latency dataset (latency.py dataset) that pNN budgets read
    latency: str = "predicted"  # predicted (latency.py fit's predictor) | measured (time every candidate)
    predictor: str = "out_latency/predictor.json"
    population: int = 40
    parents: int = 8
    mutations: int = 16
    crossovers: int = 16
    mutate_prob: float = 0.3
    iterations: int = 10
    max_tries: int = 20000  # rejection-sampling draws per new subnet (HAT: unlimited) before giving up
    floor_samples: int = 5000  # the budget floor: the lowest predicted latency of the fastest arch and this many
    # random subnets (a predictor need not be monotone); a budget below it is refused
    valid_sentences: int = 500  # fitness on the first N valid sentences (HAT: the whole valid split)
    max_tokens: int = 4096  # per validation batch
    # latency protocol (latency.py): quick for candidates, careful for the chosen subnets
    protocol: str = "beam"  # beam: the real beam search (deployed) | hat: HAT's model-only decoder steps
    threads: int = 2
    device: str = "cpu"
    search_warmup: int = 2
    search_iters: int = 10
    final_warmup: int = 5
    final_iters: int = 50
    final_repeats: int = 3
    seed: int = 1
    overwrite: bool = False  # start over in an out_dir that holds another run, deleting its files first


# the settings' checks (runs.settings.check_settings): numbers finite and >= 0 but these, and the choices
BOUNDS = dict(population=1, parents=2, mutate_prob=(0, 1), iterations=1, max_tries=1, valid_sentences=1, max_tokens=1,
              threads=1, search_iters=1, final_iters=1, final_repeats=1)
CHOICES = dict(latency=("predicted", "measured"), protocol=PROTOCOLS)


class BudgetError(ValueError):
    """No subnet of the space meets the latency budget."""


# -----------------------------------------------------------------------------
# Mutation and crossover on ArchConfig fields


def _fit_layers(space, name, values, new, rng):
    """Per-layer `values` of field `name` cut or extended to the layer count in `new`, new layers drawn uniformly
    (HAT's genome holds such values for inactive layers); a value no longer allowed (a span beyond a shorter encoder)
    is redrawn. Returns (values, the values allowed)."""
    allowed = space.choices()[name]
    if name == "dec_cross_spans":  # cross-attention can span at most the encoder's layers
        allowed = tuple(s for s in allowed if s <= new["enc_layers"])
    n = new[name[:3] + "_layers"]  # enc_* fields follow enc_layers, dec_* fields dec_layers
    values = [v if v in allowed else rng.choice(allowed) for v in values[:n]]
    return values + [rng.choice(allowed) for _ in range(n - len(values))], allowed


def mutate(arch: ArchConfig, space, prob, rng) -> ArchConfig:
    """HAT's mutation: every choice (each scalar, each active layer's value) is redrawn uniformly with probability
    `prob`; a redrawn layer count first cuts or extends the per-layer values."""
    redraw = lambda value, allowed: rng.choice(allowed) if rng.random() < prob else value
    new = {name: redraw(getattr(arch, name), space.choices()[name]) for name in SCALARS}
    for name in PER_LAYER:
        values, allowed = _fit_layers(space, name, getattr(arch, name), new, rng)
        new[name] = tuple(redraw(v, allowed) for v in values)
    return space.validate(ArchConfig(**new))


def crossover(a: ArchConfig, b: ArchConfig, space, rng) -> ArchConfig:
    """HAT's uniform crossover: every choice from either parent with probability 1/2. Layer i of a per-layer field
    comes from a parent that has layer i (from the only one if the other is shallower)."""
    pick = lambda x, y: x if rng.random() < 0.5 else y
    new = {name: pick(getattr(a, name), getattr(b, name)) for name in SCALARS}
    for name in PER_LAYER:
        va, vb = getattr(a, name), getattr(b, name)
        merged = [pick(x, y) for x, y in zip(va, vb)] + list(va[len(vb):] or vb[len(va):])  # + the deeper one's rest
        new[name] = tuple(_fit_layers(space, name, merged, new, rng)[0])
    return space.validate(ArchConfig(**new))


# -----------------------------------------------------------------------------
# The evolutionary loop


def lowest_latency(space, latency, n, rng) -> tuple:
    """(ms, arch): the lowest latency among the fastest arch and n random subnets. A fitted predictor is not
    monotone in every feature, so some subnets can be predicted faster than the all-minimum arch; a budget
    between the two is feasible and must not be refused."""
    candidates = [fastest_arch(space)] + [space.sample(rng) for _ in range(n)]
    return min((latency(a), i, a) for i, a in enumerate(candidates))[::2]


def evolve(space, fitness, latency, budget, cfg: SearchConfig, rng, log=print, floor=None) -> dict:
    """HAT's search for one budget. fitness(arch) -> validation loss (lower is better) and latency(arch) -> ms are
    the caller's (cached) functions; floor = (ms, arch), the lowest latency the caller found in the space
    (default: the all-minimum arch's). Returns the best arch of the last scored population, its loss and latency,
    the best loss after every iteration, and every arch scored."""
    floor_ms, floor_arch = floor or (latency(fastest_arch(space)), fastest_arch(space))
    if floor_ms > budget:  # nothing is faster: skip the hopeless draws
        raise BudgetError(f"no subnet of space '{space.name}' meets the {budget:g} ms budget: the fastest one "
                          f"found ({floor_arch}) takes {floor_ms:.1f} ms ({cfg.latency}); give a larger budget")

    def draw(make):
        """Rejection sampling, as HAT: make() until a subnet meets the budget (at most cfg.max_tries times)."""
        for _ in range(cfg.max_tries):
            arch = make()
            if latency(arch) <= budget:
                return arch
        raise BudgetError(f"none of {cfg.max_tries} draws met the {budget:g} ms budget although the fastest subnet "
                          f"found takes {floor_ms:.1f} ms: feasible subnets are rare; raise --max_tries or the budget")

    # HAT's loop: score and rank the population, keep the best `parents`, refill it with their mutants and children
    population = [draw(lambda: space.sample(rng)) for _ in range(cfg.population)]
    history, scored, t0 = [], {}, time.time()
    for it in range(cfg.iterations):
        ranked = sorted(population, key=fitness)  # stable: ties keep population order, so runs repeat exactly
        scored.update(dict.fromkeys(ranked))
        parents, best = ranked[:cfg.parents], ranked[0]
        history.append(fitness(best))
        log(f"budget {budget:g} ms | iter {it + 1}/{cfg.iterations} | best loss {fitness(best):.4f} | "
            f"{latency(best):.1f} ms | {len(scored)} subnets scored | {time.time() - t0:.0f} s")
        if it == cfg.iterations - 1:  # HAT's last new population is never scored: do not build it
            break
        mutants = [draw(lambda: mutate(rng.choice(parents), space, cfg.mutate_prob, rng))
                   for _ in range(cfg.mutations)]
        children = [draw(lambda: crossover(*rng.sample(parents, 2), space, rng)) for _ in range(cfg.crossovers)]
        population = parents + mutants + children
    return dict(arch=best, valid_loss=fitness(best), latency_ms=latency(best), history=history, scored=list(scored))


# -----------------------------------------------------------------------------
# Fitness and latency: what evolve() ranks subnets by, and the constraint it holds them to


def fitness(supernet, arch: ArchConfig, batches) -> float:
    """HAT's fitness of a subnet: the supernet's validation loss of `arch` (nats per target token, no label
    smoothing) on fixed valid batches; lower is better. The subnet is extracted (its MoS mixture computed once) and
    scored as the plain Transformer it is (train.valid_loss)."""
    return valid_loss(supernet.subnet(arch), batches)


def predicted_latency(predictor: dict, arch: ArchConfig, space) -> float:
    """The latency predictor's ms for `arch`, from its architecture features (latency.py fit): the default, fast
    way to hold a candidate to the budget."""
    return float(predict(predictor, mos.arch_features(arch, space).numpy())[0])


def measured_latency(supernet, arch: ArchConfig, cfg: SearchConfig, warmup: int, iters: int) -> float:
    """The median ms of `arch` extracted from the supernet and timed with latency.py's protocol: every candidate
    with --latency=measured, and every winner, carefully, at the end."""
    return measure_latency(supernet.subnet(arch), warmup=warmup, iters=iters, device=cfg.device, threads=cfg.threads,
                           protocol=cfg.protocol)["median_ms"]


# -----------------------------------------------------------------------------
# The run


@releases_locks
def main(argv):
    """Search every budget on one supernet, re-measure the winners, write the arch files, results and plots."""
    cfg = parse_settings(SearchConfig, argv)
    check_settings(cfg, BOUNDS, CHOICES)
    check_budgets(cfg.budgets)
    if cfg.population != cfg.parents + cfg.mutations + cfg.crossovers:  # HAT asserts the same
        raise SystemExit(f"error: population {cfg.population} != parents + mutations + crossovers")
    percentiles = any(isinstance(b, str) for b in cfg.budgets)  # then the latency dataset is read: an input too
    reads = [cfg.ckpt, cfg.predictor if cfg.latency == "predicted" else "", cfg.latency_csv if percentiles else ""]
    out_dir = check_target(cfg.out_dir, "--out_dir", reads)
    torch.set_num_threads(cfg.threads)
    t_start, device = time.time(), get_device(cfg.device)
    # the supernet and the data it was trained on: fitness is the supernet's loss of a subnet on fixed valid batches
    ckpt = load_checkpoint(cfg.ckpt)
    if ckpt["kind"] != "supernet":
        raise SystemExit(f"error: {cfg.ckpt} holds a standalone model; search needs a supernet checkpoint")
    supernet = model_from_checkpoint(ckpt).to(device).eval()
    space, trained = supernet.space, ckpt["config"]  # the data the supernet was trained on
    corpus = load_data(trained["data"], trained["data_dir"], trained.get("data_source", ""), trained["seed"])
    check_vocab(ckpt, corpus, cfg.ckpt)
    batches = split_batches(corpus, "valid", cfg.max_tokens, device, cfg.valid_sentences)  # collated once
    predictor = predictor_for(cfg.predictor, space.name, cfg.protocol, cfg.latency == "predicted", load_predictor)
    budgets = budgets_in_ms(cfg.budgets, cfg.latency_csv, space.name, cfg.protocol, read_latency_csv)
    inputs = dict(ckpt=str(Path(cfg.ckpt).resolve()), latency=cfg.latency, protocol=cfg.protocol, seed=cfg.seed,
                  predictor=str(Path(cfg.predictor).resolve()) if cfg.latency == "predicted" else None,
                  budgets=[b if type(b) in (int, float) else ms for b, ms in zip(cfg.budgets, budgets)],
                  valid_sentences=cfg.valid_sentences)  # what the results depend on (pNN: its ms)
    claim_folder(out_dir, "search.py", inputs, reads, cfg.overwrite, legacy=("cache.json",))  # runs/folders.py
    # the scores, cached per arch, and the constraint: the predictor's latency (fast, from the arch's features) or the
    # extracted subnet timed (slow, exact)
    tag = file_identity(cfg.ckpt, "ckpt") | {k: getattr(cfg, k) for k in (  # what the cached numbers depend on
        "valid_sentences", "max_tokens", "threads", "device", "search_iters", "search_warmup", "protocol")}
    cache = Cache(out_dir / "cache.json", tag, conditions=machine_state(cfg.threads))  # scores outlive a kill
    score = cache.wrap("valid_loss", partial(fitness, supernet, batches=batches))  # keyed by the arch's JSON
    predicted = None if predictor is None else partial(predicted_latency, predictor, space=space)
    measured = cache.wrap("measured_ms", partial(measured_latency, supernet, cfg=cfg, warmup=cfg.search_warmup,
                                                 iters=cfg.search_iters))
    latency = measured if cfg.latency == "measured" else predicted
    protocol = f"{cfg.protocol} protocol, {cfg.device}, {cfg.threads} threads, batch 1, beam 5, 23+23 tokens"
    floor = lowest_latency(space, latency, cfg.floor_samples, random.Random(cfg.seed)) if latency is predicted else None
    print(f"searching {space.name} space of {cfg.ckpt} | {len(batches)} valid batches ({cfg.valid_sentences} "
          f"sentences) | {cfg.latency} latency | budgets {budgets} ms" + (f" (percentiles {list(cfg.budgets)} of "
                                                                          f"{cfg.latency_csv})" if percentiles else ""))

    # one evolutionary search per budget; its winner is then timed carefully, whatever latency the search used
    results, scored = [], {}  # scored: every subnet this run scored, under any budget (in order)
    for budget, given in zip(budgets, cfg.budgets):
        t0 = time.time()
        try:
            r = evolve(space, score, latency, float(budget), cfg, random.Random(cfg.seed), floor=floor)
        except BudgetError as e:
            raise SystemExit(f"error: {e}")
        before = machine_state(cfg.threads)  # the final figure is only as good as the machine was quiet
        runs = [measured_latency(supernet, r["arch"], cfg, cfg.final_warmup, cfg.final_iters)
                for _ in range(cfg.final_repeats)]
        conditions = dict(before=before, after=machine_state(cfg.threads))
        if busy := busy_warning(before, conditions["after"], cfg.threads):
            print(f"warning: budget {budget:g} ms's winner: {busy}; `experiments/latency_checks.py remeasure` "
                  f"repeats it side by side")
        final = sorted(runs)[len(runs) // 2]  # the median of the repeats
        name = given if isinstance(given, str) else f"{budget:g}ms"  # its arch file: arch_p25.json, arch_18ms.json
        result = dict(budget_ms=float(budget), budget=name, arch=r["arch"].to_dict(), valid_loss=r["valid_loss"],
                      search_latency_ms=r["latency_ms"], measured_ms=final, measured_runs_ms=runs,
                      measured_spread=(max(runs) - min(runs)) / final, conditions=conditions,
                      predicted_ms=predicted(r["arch"]) if predicted else None,
                      within_budget=final <= budget, over_budget_pct=max(0.0, 100 * (final / budget - 1)),
                      params_no_emb=mos.num_params(r["arch"], space, 0, 0, embeddings=False),
                      history=r["history"], n_scored=len(r["scored"]), seconds=round(time.time() - t0, 1))
        results.append(result)
        scored.update(dict.fromkeys(r["scored"]))
        pred = f"{result['predicted_ms']:.1f}" if predicted else "n/a"
        verdict = "within budget" if final <= budget else f"{result['over_budget_pct']:.1f}% over"
        print(f"budget {budget:g} ms: loss {r['valid_loss']:.4f} | predicted {pred} ms | re-measured {final:.1f} ms "
              f"({verdict}) | {result['seconds']:.0f} s")

    # the outputs, written only once every number is finite: an arch file per budget, results.json, the plots
    candidates = [(latency(a), score(a)) for a in scored]  # all cached by now
    if not all(math.isfinite(x) for c in candidates for x in c):  # validate, then write: never a NaN winner
        raise SystemExit(f"error: the supernet {cfg.ckpt} gives non-finite losses or latencies; {out_dir}'s results "
                         f"are left as they were")
    for result in results:  # ready for train.py --arch=FILE
        write_json(out_dir / f"arch_{result['budget']}.json", result["arch"])
    plot_search(results, candidates, cfg.latency, protocol, out_dir)  # candidates.png, convergence.png
    write_json(out_dir / "results.json", dict(settings=asdict(cfg), protocol=protocol, space=space.name,
                                              seconds=round(time.time() - t_start, 1), results=results,
                                              candidates=[dict(arch=a.to_dict(), latency_ms=lat, valid_loss=loss)
                                                          for a, (lat, loss) in zip(scored, candidates)]))
    print(f"done in {time.time() - t_start:.0f} s -> {out_dir}/results.json, candidates.png, convergence.png")
    return results


if __name__ == "__main__":
    run(main)
