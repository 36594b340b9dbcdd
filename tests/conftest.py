"""Shared fixtures."""

import json
from dataclasses import asdict

import pytest
import torch

from runs.checkpoints import save_checkpoint
from data.corpus import make_toy_corpus
from mos import FEATURE_NAMES, SPACES, SuperTransformer
from train import PRESETS, TrainConfig


@pytest.fixture
def one_thread():
    """One intra-op thread for timing tests: two spinning threads on a machine another job keeps busy slow down 100x."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny supernet checkpoint in train.py's format and a linear latency predictor for its space."""
    folder = tmp_path_factory.mktemp("tiny")
    cfg = TrainConfig(**{**PRESETS["toy"], "preset": "toy"})
    corpus = make_toy_corpus(seed=cfg.seed)
    torch.manual_seed(0)
    model = SuperTransformer(SPACES["tiny"], len(corpus.src_vocab), len(corpus.tgt_vocab), router_hidden=32)
    save_checkpoint(dict(kind="supernet", model=model.state_dict(), model_args=model.init_args(), config=asdict(cfg),
                         vocab=dict(src=corpus.src_vocab.itos, tgt=corpus.tgt_vocab.itos), step=0), folder / "ckpt.pt")
    weight = [10.0 if n == "dec_layers" else 0.0 for n in FEATURE_NAMES]  # 1 ms + 5 per decoder layer: 6 or 11 ms
    (folder / "predictor.json").write_text(json.dumps(dict(kind="linear", weight=weight, bias=1.0, space="tiny",
                                                             protocol="beam")))
    return folder
