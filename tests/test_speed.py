"""Issue 32's speed work changes no numerics: the explicit CPU attention equals torch's SDPA, the dropout is
dropout, the written-out label-smoothed loss equals F.cross_entropy in value and gradient, the model's
equivalences hold under CPU bf16 autocast within a stated tolerance, and the run-start precision choice leaves
the run as it was. No timing here (experiments/bench.py measures speed). Run: python -m pytest -q tests/test_speed.py"""

import dataclasses
import json
import random

import pytest
import torch
import torch.nn.functional as F

import mos
import train
from runs import loop
from mos import PAD, SPACES, SuperTransformer
from test_mos import SRC_V, TGT_V, batch, reversal_batch, trained_reverser

# Relative L2 error allowed between two computations of the same logits under bf16 autocast (as tests/test_gpu.py):
# 0.4-0.9% measured over the cpu and iwslt14 spaces' subnets, so 3%.
BF16_TOL = 3e-2


def rel_err(a, b) -> float:
    """||a - b|| / ||b||, in fp32."""
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def qkv(B=3, h=4, T=5, S=7, D=16, seed=0):
    """Random queries (B, h, T, D) and keys/values (B, h, S, D)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, h, n, D, generator=g) for n in (T, S, S)]


def test_cpu_attention_equals_torch_sdpa_for_every_mask_the_model_uses():
    q, k, v = qkv()
    q.requires_grad_()  # a backward follows: the formula path (without one, attend is torch's kernel itself)
    pad = torch.ones(3, 1, 1, 7, dtype=torch.bool)
    pad[1, ..., 4:] = False  # a padded source sentence
    offset = torch.ones(5, 7, dtype=torch.bool).tril(2)  # 5 new positions after 2 cached ones
    for mask in (None, pad, offset):
        expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        ours = mos.attend(q, k, v, mask)
        assert (ours - expected).abs().max() < 1e-5
        (grad_ours,), (grad_torch,) = (torch.autograd.grad(y.square().sum(), q) for y in (ours, expected))
        assert (grad_ours - grad_torch).abs().max() < 1e-4
        with torch.no_grad():
            assert (mos.attend(q, k, v, mask) - expected).abs().max() < 1e-5
    q, k, v = qkv(S=5)
    q.requires_grad_()
    causal = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert (mos.attend(q, k, v, causal=True) - causal).abs().max() < 1e-5
    with torch.autocast("cpu", torch.bfloat16):
        assert rel_err(mos.attend(q, k, v, causal=True), causal) < BF16_TOL


def test_dropout_drops_at_rate_p_scales_the_rest_and_is_off_in_eval():
    x = torch.ones(200_000, requires_grad=True)
    assert mos.apply_dropout(x, 0.3, training=False) is x and mos.apply_dropout(x, 0.0, training=True) is x
    torch.manual_seed(0)
    y = mos.apply_dropout(x, 0.3, training=True)
    kept = y != 0
    assert abs(1 - kept.float().mean().item() - 0.3) < 0.005  # zeroed with probability p
    assert torch.allclose(y[kept], torch.full_like(y[kept], 1 / 0.7))  # the rest scaled by 1 / (1 - p)
    y.sum().backward()
    assert torch.equal(x.grad, kept.float() / 0.7)  # the gradient flows through the kept entries only
    torch.manual_seed(0)
    assert torch.equal(mos.apply_dropout(x, 0.3, training=True), y)  # seeded: the same mask again


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_written_out_loss_equals_torch_cross_entropy_in_value_and_gradient(eps):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 6, 11, dtype=torch.float64, generator=g, requires_grad=True)
    target = torch.randint(4, 11, (4, 6), generator=g)
    target[0, 3:], target[2, 1:] = PAD, PAD  # padded target sentences
    ours = train.token_loss(logits, target, eps)
    torchs = F.cross_entropy(logits.flatten(0, 1), target.flatten(), ignore_index=PAD, label_smoothing=eps,
                             reduction="sum")
    assert abs(ours.item() - torchs.item()) < 1e-12
    (grad_ours,), (grad_torch,) = (torch.autograd.grad(2.5 * l, logits) for l in (ours, torchs))
    assert (grad_ours - grad_torch).abs().max() < 1e-12
    bf16 = logits.detach().bfloat16().requires_grad_()  # bf16 logits: an fp32 loss, a bf16 gradient
    loss = train.token_loss(bf16, target, eps)
    loss.backward()
    assert loss.dtype == torch.float32 and bf16.grad.dtype == torch.bfloat16
    assert abs(loss.item() - torchs.item()) < 1e-2 * torchs.item() and rel_err(bf16.grad, grad_torch / 2.5) < BF16_TOL


@pytest.mark.parametrize("router", ["none", "neuron"])
def test_extracted_subnet_equals_supernet_under_cpu_bf16_autocast(router):
    torch.manual_seed(0)
    space, (src, tgt_in) = SPACES["cpu"], batch()
    model = SuperTransformer(space, SRC_V, TGT_V, num_experts=1 if router == "none" else 2, router=router).eval()
    for arch in (space.largest(), space.smallest(), space.sample(random.Random(1))):
        fp32, extracted = model(src, tgt_in, arch), model.subnet(arch)  # extracted in fp32, as every real run does
        assert all(p.dtype == torch.float32 for p in extracted.parameters())
        with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16):
            supernet, subnet = model(src, tgt_in, arch), extracted(src, tgt_in)
        assert rel_err(subnet, supernet) <= BF16_TOL and rel_err(supernet, fp32) <= BF16_TOL, arch


def test_cached_beam_search_equals_uncached_under_cpu_bf16_autocast():
    model, g = trained_reverser(steps=100)
    src, _, _ = reversal_batch(g, B=16)
    with torch.autocast("cpu", torch.bfloat16):
        (cached, scores), (uncached, scores_nc) = (mos.beam_search(model, src, beam=4, use_cache=c) for c in (1, 0))
    assert cached == uncached and (scores - scores_nc).abs().max() < 0.05  # summed bf16 log-probabilities


def test_precision_choice_leaves_weights_gradients_and_random_state_as_they_were(monkeypatch):
    torch.manual_seed(0)
    space, cfg = SPACES["tiny"], train.TrainConfig(space="tiny")
    model = SuperTransformer(space, SRC_V, TGT_V)
    src, tgt_in = batch()
    step = [src, tgt_in, torch.cat([tgt_in[:, 1:], torch.full((3, 1), mos.EOS)], 1)]  # src, tgt_in, tgt_out
    before = {k: v.clone() for k, v in model.state_dict().items()}
    one_step = lambda bf16: train.train_step(model, step, [space.largest()], dataclasses.replace(cfg, bf16=bf16))
    monkeypatch.setattr(loop, "fast_bf16", lambda device: False)  # emulated bf16: fp32 without timing anything
    assert loop.faster_precision(one_step, model, torch.device("cpu"), ddp=False)[0] is False
    monkeypatch.setattr(loop, "fast_bf16", lambda device: True)
    state = torch.get_rng_state()
    bf16, why = loop.faster_precision(one_step, model, torch.device("cpu"), ddp=False)
    assert isinstance(bf16, bool) and "fp32" in why and "bf16" in why
    assert torch.equal(torch.get_rng_state(), state)  # the run's dropout masks are the ones it would have drawn
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


def test_unset_precision_is_decided_at_the_start_said_and_stored(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(loop, "fast_bf16", lambda device: False)  # the CI machine's answer, whatever it runs on
    out = tmp_path / "run"
    train.main(["--preset=toy", "--bf16=None", "--max_steps=2", "--bleu_sentences=-1", "--test_sentences=4",
                f"--out_dir={out}"])
    assert "precision fp32: this device has no native bf16" in capsys.readouterr().out
    assert json.loads((out / "config.json").read_text())["bf16"] is False  # a resumed run keeps it
