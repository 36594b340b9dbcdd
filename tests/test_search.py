"""Tests of search.py: mutation/crossover stay in the space, the budget is a hard constraint, an unreachable budget
fails clearly, an end-to-end search on a tiny supernet, determinism and the resume cache (CPU, seconds).
Run: python -m pytest -q tests/test_search.py"""

import dataclasses
import json
import random

import numpy as np
import pytest

import latency
import search
from mos import SPACES
from search import BudgetError, SearchConfig, crossover, evolve, mutate

SMALL = dict(population=8, parents=2, mutations=3, crossovers=3, iterations=3)  # a few seconds on the tiny space


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def toy_latency(arch):
    """A deterministic stand-in for latency (ms): decoder depth dominates, as measured."""
    return 10.0 * arch.dec_layers + sum(arch.dec_ffn_dims) / 64 + arch.enc_embed_dim / 64


def toy_fitness(arch):
    """A stand-in for validation loss: bigger subnets are better."""
    return 10.0 - arch.dec_layers - sum(arch.enc_ffn_dims + arch.dec_ffn_dims) / 1000


@pytest.mark.parametrize("name", list(SPACES))
def test_mutation_and_crossover_stay_in_space(name):
    space, rng = SPACES[name], random.Random(0)
    for _ in range(500):
        a, b = space.sample(rng), space.sample(rng)
        for prob in (0.3, 1.0):
            assert space.validate(mutate(a, space, prob, rng))
        assert space.validate(crossover(a, b, space, rng))
    a = space.sample(rng)
    assert mutate(a, space, 0.0, rng) == a  # probability 0 changes nothing
    assert crossover(a, a, space, rng) == a


def test_mutation_reaches_every_choice():
    space, rng = SPACES["cpu"], random.Random(0)
    seen = {mutate(space.smallest(), space, 0.5, rng).dec_layers for _ in range(200)}
    assert seen == set(space.dec_layers)


def test_budget_respected_and_seed_repeats():
    space, cfg, budget = SPACES["cpu"], SearchConfig(**SMALL), 40.0
    runs = [evolve(space, toy_fitness, toy_latency, budget, cfg, random.Random(7), log=lambda m: None)
            for _ in range(2)]
    assert all(toy_latency(a) <= budget for a in runs[0]["scored"])
    assert runs[0]["arch"].dec_layers == 2  # the best that fits: 3 decoder layers cost > 40 ms here
    assert runs[0]["arch"] == runs[1]["arch"] and runs[0]["history"] == runs[1]["history"]
    assert runs[0]["history"] == sorted(runs[0]["history"], reverse=True)  # elitism: never worse


def test_unreachable_budget_raises_clearly():
    space, cfg = SPACES["cpu"], SearchConfig(**SMALL)
    with pytest.raises(BudgetError, match=r"fastest one found .* takes 17\.0 ms"):
        evolve(space, toy_fitness, toy_latency, 5.0, cfg, random.Random(0), log=lambda m: None)
    # reachable in principle, but rejection sampling gives up after max_tries draws instead of looping forever
    fastest = dataclasses.replace(space.smallest(), dec_cross_spans=(1,))
    cfg.max_tries = 20
    with pytest.raises(BudgetError, match="none of 20 draws met the 17 ms budget"):
        evolve(space, toy_fitness, lambda a: 17.0 if a == fastest else 99.0, 17.0, cfg, random.Random(0),
               log=lambda m: None)


def test_budget_below_the_all_minimum_arch_but_above_the_predicted_floor_is_feasible():
    space, cfg = SPACES["cpu"], SearchConfig(**SMALL)
    # a fitted predictor need not be monotone: here 4 heads in the first encoder layer look 8 ms faster than 2,
    # so random subnets can be predicted faster than the all-minimum arch (17 ms)
    odd_latency = lambda arch: toy_latency(arch) - (8.0 if arch.enc_heads[0] == 4 else 0.0)
    floor = search.lowest_latency(space, odd_latency, 2000, random.Random(0))
    assert floor[0] < odd_latency(latency.fastest_arch(space)) == 17.0
    budget = 14.0  # between the two: refused before, although subnets meet it
    r = evolve(space, toy_fitness, odd_latency, budget, cfg, random.Random(0), log=lambda m: None, floor=floor)
    assert odd_latency(r["arch"]) <= budget and all(odd_latency(a) <= budget for a in r["scored"])


# -----------------------------------------------------------------------------
# End to end on a randomly initialised tiny supernet (the search does not care whether it was trained)


def run_search(tiny, out, *extra):
    """search.main on the tiny supernet with small settings; `extra` overrides them."""
    args = [f"--ckpt={tiny / 'ckpt.pt'}", f"--predictor={tiny / 'predictor.json'}", f"--out_dir={out}",
            "--budgets=[8,20]", "--valid_sentences=100", "--threads=1", "--final_iters=3", "--final_repeats=1",
            "--final_warmup=1", *[f"--{k}={v}" for k, v in SMALL.items()], *extra]
    return search.main(args)


def test_search_end_to_end_deterministic(tiny, tmp_path):
    first = run_search(tiny, tmp_path / "a")
    for name in ("arch_8ms.json", "arch_20ms.json", "results.json", "candidates.png", "convergence.png",
                 "cache.json"):
        assert (tmp_path / "a" / name).exists(), name
    assert first[0]["search_latency_ms"] <= 8 and first[0]["arch"]["dec_layers"] == 1  # 2 layers: 11 ms
    assert first[1]["search_latency_ms"] <= 20
    assert first[0]["measured_ms"] > 0 and first[0]["predicted_ms"] == first[0]["search_latency_ms"]
    second = run_search(tiny, tmp_path / "b")
    assert [(r["arch"], r["valid_loss"], r["history"]) for r in first] == \
           [(r["arch"], r["valid_loss"], r["history"]) for r in second]


def test_search_resumes_from_cache(tiny, tmp_path, monkeypatch):
    timed = []

    def fake_timer(model, **protocol):
        """--latency=measured with a fake clock: 1 ms + 5 ms per decoder layer, whatever the machine's load."""
        timed.append(model.arch)
        return {"median_ms": 1.0 + 5.0 * model.arch.dec_layers}
    monkeypatch.setattr(search, "measure_latency", fake_timer)
    first = run_search(tiny, tmp_path, "--latency=measured", "--search_iters=2", "--search_warmup=0")
    assert first[0]["arch"]["dec_layers"] == 1 and first[0]["search_latency_ms"] == 6.0  # 2 layers: 11 > 8 ms
    n_timed = len(timed)

    def no_rescoring(*args):
        raise AssertionError("a cached subnet was scored again")
    monkeypatch.setattr(search, "valid_loss", no_rescoring)
    again = run_search(tiny, tmp_path, "--latency=measured", "--search_iters=2", "--search_warmup=0")
    assert [r["arch"] for r in first] == [r["arch"] for r in again]
    assert len(timed) == n_timed + 2  # only the two winners' final re-measurement: no candidate was timed again
    # the conditions: the machine's load during each winner's re-measurement, and one entry per search session
    assert set(again[0]["conditions"]["before"]) >= {"load_1min", "cores", "others", "time"}
    assert len(json.loads((tmp_path / "cache.json").read_text())["sessions"]) == 2


def test_search_rejects_unreachable_budget(tiny, tmp_path):
    with pytest.raises(SystemExit, match="fastest one found"):
        run_search(tiny, tmp_path, "--budgets=[5]")


def test_budgets_as_percentiles_of_the_latency_dataset(tiny, tmp_path):
    """--budgets=[p50]: the median of the dataset's measured latencies, in ms, its arch file arch_p50.json; a
    dataset of another space is refused, and so is a percentile outside (0, 100)."""
    csv_path = tmp_path / "latency.csv"
    latency.main(["dataset", "--space=tiny", "--n=12", f"--out={csv_path}", "--iters=1", "--warmup=0", "--threads=1"])
    measured = latency.read_latency_csv(csv_path)[1]
    found = run_search(tiny, tmp_path / "s", "--budgets=[p50,100000]", f"--latency_csv={csv_path}")
    assert found[0]["budget_ms"] == round(float(np.percentile(measured, 50)), 2) and found[1]["budget_ms"] == 100000
    assert (tmp_path / "s" / "arch_p50.json").exists() and (tmp_path / "s" / "arch_100000ms.json").exists()
    other = tmp_path / "cpu.csv"
    other.write_text(csv_path.read_text().replace("\ntiny,", "\ncpu,"))
    with pytest.raises(SystemExit, match="holds latencies of space 'cpu'"):
        run_search(tiny, tmp_path / "t", "--budgets=[p50]", f"--latency_csv={other}")
    for bad in ("[p100]", "[p0]", "[q5]", "[p-3]"):
        with pytest.raises(SystemExit, match="or of percentiles of --latency_csv"):
            search.check_budgets(search.parse_settings(search.SearchConfig, [f"--budgets={bad}"]).budgets)
