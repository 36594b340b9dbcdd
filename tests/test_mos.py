"""Tests of mos.py: subnet extraction, MoS mixing, routers, search spaces and decoding (CPU, < 1 minute).
Run: python -m pytest -q tests/test_mos.py"""

import dataclasses
import random

import pytest
import torch
import torch.nn.functional as F

import mos
from mos import BOS, EOS, PAD, SPACES, ArchConfig, SuperTransformer

SRC_V, TGT_V = 40, 50


def batch(seed=0, B=3, S=7, T=6):
    """A small random batch (src with padding in one row, teacher-forced target inputs)."""
    g = torch.Generator().manual_seed(seed)
    src = torch.randint(4, SRC_V, (B, S), generator=g)
    src[1, S - 2:] = PAD
    tgt_in = torch.randint(4, TGT_V, (B, T), generator=g)
    tgt_in[:, 0] = BOS
    return src, tgt_in


@pytest.mark.parametrize("space_name", ["cpu", "iwslt14"])
@pytest.mark.parametrize("router", ["none", "layer", "neuron"])
def test_subnet_equals_supernet_and_param_formula(space_name, router):
    torch.manual_seed(0)
    space = SPACES[space_name]
    model = SuperTransformer(space, SRC_V, TGT_V, num_experts=1 if router == "none" else 2, router=router).eval()
    rng, (src, tgt_in) = random.Random(1), batch()
    for arch in [space.largest(), space.smallest()] + [space.sample(rng) for _ in range(3)]:
        subnet = model.subnet(arch)
        assert isinstance(subnet, mos.Transformer) and all(isinstance(l.ffn.fc1, torch.nn.Linear) for l in subnet.encoder)
        diff = (subnet(src, tgt_in) - model(src, tgt_in, arch)).abs().max().item()
        assert diff <= 1e-5, f"{arch}: max abs diff {diff}"
        assert sum(p.numel() for p in subnet.parameters()) == mos.num_params(arch, space, SRC_V, TGT_V)


def test_one_expert_moS_is_plain_weight_sharing():
    torch.manual_seed(0)
    space, (src, tgt_in) = SPACES["cpu"], batch()
    plain = SuperTransformer(space, SRC_V, TGT_V, num_experts=1, router="none").eval()
    arch = space.sample(random.Random(3))
    for router in ["layer", "neuron"]:
        moe = SuperTransformer(space, SRC_V, TGT_V, num_experts=1, router=router).eval()
        missing, unexpected = moe.load_state_dict(plain.state_dict(), strict=False)
        assert not unexpected and all("router" in k for k in missing)  # only the routers are new
        assert torch.equal(moe(src, tgt_in, arch), plain(src, tgt_in, arch))


def test_supernet_is_stateless():
    torch.manual_seed(0)
    space, (src, tgt_in) = SPACES["cpu"], batch()
    model = SuperTransformer(space, SRC_V, TGT_V).eval()
    a, b = space.largest(), space.smallest()
    first = model(src, tgt_in, a)
    model(src, tgt_in, b)
    assert torch.equal(first, model(src, tgt_in, a))


@pytest.mark.parametrize("router", ["layer", "neuron"])
def test_router_weights_are_distributions_that_depend_on_arch_and_get_gradients(router):
    torch.manual_seed(0)
    space = SPACES["cpu"]
    model = SuperTransformer(space, SRC_V, TGT_V, num_experts=3, router=router).eval()
    ffn, rng = model.shared.decoder[0].ffn, random.Random(0)
    a1, a2 = space.largest(), space.smallest()
    f1, f2 = mos.arch_features(a1, space), mos.arch_features(a2, space)
    alpha_a1 = ffn.alphas(f1, a1.dec_embed_dim, a1.dec_ffn_dims[0], training=False)[0]
    alpha_a2 = ffn.alphas(f2, a1.dec_embed_dim, a1.dec_ffn_dims[0], training=False)[0]
    assert torch.allclose(alpha_a1.sum(-1), torch.ones(())) and (alpha_a1 >= 0).all()
    assert not torch.allclose(alpha_a1, alpha_a2)
    model.train()
    src, tgt_in = batch()
    model(src, tgt_in, space.sample(rng)).logsumexp(-1).mean().backward()
    router_grads = [p.grad for n, p in model.named_parameters() if "router" in n and "decoder.0." in n]
    assert router_grads and all(g is not None and g.abs().sum() > 0 for g in router_grads)


def test_neuron_wise_mixtures_differ_between_neurons_after_training():
    torch.manual_seed(0)
    space, (src, tgt_in) = SPACES["cpu"], batch()
    model = SuperTransformer(space, SRC_V, TGT_V, num_experts=2, router="neuron")
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    rng = random.Random(0)
    for _ in range(5):
        logits = model(src, tgt_in, space.sample(rng))
        F.cross_entropy(logits.flatten(0, 1), tgt_in.flatten()).backward()
        opt.step()
        opt.zero_grad()
    arch = space.largest()
    alpha1, alpha2 = model.shared.encoder[0].ffn.alphas(mos.arch_features(arch, space), arch.enc_embed_dim,
                                                      arch.enc_ffn_dims[0], training=False)
    assert alpha1.shape == (arch.enc_ffn_dims[0], 2) and alpha2.shape == (arch.enc_embed_dim, 2)
    assert alpha1[:, 0].std() > 1e-3 and alpha2[:, 0].std() > 1e-3  # not one mixture shared by all neurons


def test_extracted_subnet_trains_without_touching_the_supernet():
    torch.manual_seed(0)
    space, (src, tgt_in) = SPACES["cpu"], batch()
    model = SuperTransformer(space, SRC_V, TGT_V)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    subnet = model.subnet(space.smallest()).train()
    subnet(src, tgt_in).sum().backward()
    torch.optim.SGD(subnet.parameters(), lr=1.0).step()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_sampled_archs_validate_and_bad_fields_raise_clear_errors():
    for space in SPACES.values():
        rng = random.Random(0)
        for _ in range(200):
            arch = space.validate(space.sample(rng))
            assert ArchConfig.from_dict(arch.to_dict()) == arch and hash(arch) == hash(ArchConfig.from_dict(arch.to_dict()))
        arch = space.largest()
        with pytest.raises(ValueError, match=r"'dec_ffn_dims\[0\]' = 3 .*allowed"):
            space.validate(dataclasses.replace(arch, dec_ffn_dims=(3,) + arch.dec_ffn_dims[1:]))
        with pytest.raises(ValueError, match=r"'enc_embed_dim' = 7 .*allowed"):
            space.validate(dataclasses.replace(arch, enc_embed_dim=7))
        with pytest.raises(ValueError, match=r"'dec_heads' has 1 values but dec_layers"):
            space.validate(dataclasses.replace(arch, dec_heads=(4,)))
        with pytest.raises(ValueError, match=r"'dec_layers' = 99"):
            space.validate(dataclasses.replace(arch, dec_layers=99))
    d = SPACES["cpu"].largest().to_dict()
    with pytest.raises(ValueError, match="unknown keys"):
        ArchConfig.from_dict({**d, "colour": 1})
    with pytest.raises(ValueError, match="must be an integer"):
        ArchConfig.from_dict({**d, "enc_layers": "3"})
    with pytest.raises(ValueError, match="must be a list of integers"):
        ArchConfig.from_dict({**d, "enc_heads": 4})


def test_arch_features_are_normalised_by_the_space():
    for space in SPACES.values():
        assert torch.equal(mos.arch_features(space.largest(), space)[[0, 2, 4, 6]], torch.ones(4))
        f = mos.arch_features(space.sample(random.Random(0)), space)
        assert f.shape == (len(mos.FEATURE_NAMES),) and (f > 0).all() and (f <= 1).all()


def reversal_batch(g, B=64, L=8, V=12):
    """The synthetic task: the source is y reversed (+ EOS), the target is y."""
    y = torch.randint(4, V, (B, L), generator=g)
    src = torch.cat([y.flip(1), torch.full((B, 1), EOS)], 1)
    return src, torch.cat([torch.full((B, 1), BOS), y], 1), torch.cat([y, torch.full((B, 1), EOS)], 1)


def trained_reverser(steps=400, V=12, seed=0):
    """A tiny Transformer that learns to reverse random sequences, trained in a few seconds."""
    torch.manual_seed(seed)
    arch = ArchConfig(64, 2, (128, 128), (4, 4), 64, 2, (128, 128), (4, 4), (4, 4), (1, 2))
    model = mos.Transformer(arch, V, V, qkv_dim=64, max_len=64)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3, betas=(0.9, 0.98))
    warmup = 50  # post-norm Transformers need a warm-up; then inverse-sqrt decay
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min((s + 1) / warmup, (warmup / (s + 1)) ** 0.5))
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        src, tgt_in, tgt_out = reversal_batch(g, V=V)
        F.cross_entropy(model(src, tgt_in).flatten(0, 1), tgt_out.flatten()).backward()
        opt.step()
        opt.zero_grad()
        sched.step()
    return model.eval(), g


def test_tiny_model_learns_reversal_and_beam_search_decodes_it():
    model, g = trained_reverser()
    src, _, tgt_out = reversal_batch(g, B=32)
    hyps, _ = mos.beam_search(model, src, beam=4)
    correct = sum(h == row[:-1].tolist() for h, row in zip(hyps, tgt_out))
    assert correct >= 30, f"only {correct}/32 sequences reversed correctly"


def test_cached_decoding_equals_uncached_and_beam_one_equals_greedy():
    model, g = trained_reverser(steps=100)
    src, _, _ = reversal_batch(g, B=16)
    src[3, 4], src[3, 5:] = EOS, PAD  # one shorter, padded sentence in the batch
    hyps, scores = mos.beam_search(model, src, beam=4)
    hyps_nc, scores_nc = mos.beam_search(model, src, beam=4, use_cache=False)
    assert hyps == hyps_nc and torch.allclose(scores, scores_nc, atol=1e-5)
    greedy, greedy_scores = mos.greedy_decode(model, src)
    greedy_nc, greedy_scores_nc = mos.greedy_decode(model, src, use_cache=False)
    assert greedy == greedy_nc and torch.allclose(greedy_scores, greedy_scores_nc, atol=1e-5)
    beam1, beam1_scores = mos.beam_search(model, src, beam=1, lenpen=0.0)
    assert beam1 == greedy and torch.allclose(beam1_scores, greedy_scores, atol=1e-5)


def test_special_token_ids_match_the_data_vocabularies():
    from data.batching import SPECIALS
    assert [SPECIALS.index(s) for s in ("<pad>", "<s>", "</s>", "<unk>")] == [PAD, BOS, EOS, mos.UNK]


@pytest.mark.parametrize("chunks", [[4], [2, 3], [1, 3, 2]])
def test_several_new_positions_into_a_cache_equal_teacher_forcing(chunks):
    torch.manual_seed(0)
    model = mos.Transformer(SPACES["tiny"].largest(), SRC_V, TGT_V, SPACES["tiny"].qkv_dim).eval()
    src, tgt_in = batch(T=sum(chunks))
    enc_outs, src_mask = model.encode(src)
    full = model.decode(tgt_in, enc_outs, src_mask)  # (B, T, V) teacher forcing, no cache
    cache, start, pieces = {}, 0, []
    for n in chunks:  # feed the same positions in chunks of n new ones through one cache
        pieces.append(model.decode(tgt_in[:, start:start + n], enc_outs, src_mask, cache))
        start += n
    assert (torch.cat(pieces, 1) - full).abs().max() < 1e-5


def test_beam_search_never_returns_an_empty_hypothesis_and_can_force_a_length():
    class EagerToStop(mos.Transformer):
        """A model for which EOS is by far the likeliest token at every step."""
        def decode(self, *args, **kwargs):
            logits = super().decode(*args, **kwargs)
            logits[..., EOS] += 50.0
            return logits

    torch.manual_seed(0)
    model = EagerToStop(SPACES["tiny"].smallest(), SRC_V, TGT_V, SPACES["tiny"].qkv_dim).eval()
    src, _ = batch()
    for decode in (mos.beam_search, mos.greedy_decode):
        hyps, _ = decode(model, src)
        assert all(len(h) == 1 for h in hyps), hyps  # min_len 1 (fairseq): one token, then EOS
        hyps, _ = decode(model, src, max_len_a=0, max_len_b=23, min_len=22)
        assert all(len(h) == 22 for h in hyps)  # 22 tokens + EOS: exactly 23 decoder steps


def test_attention_init_is_one_xavier_draw_over_the_stacked_in_proj():
    torch.manual_seed(0)
    C, Q = 640, 512  # HAT's iwslt14 supernet: bound sqrt(6 / (3Q + C)) = 0.0525, not separate q / kv bounds
    attn = mos.Attention(C, C, Q, heads=4)
    stacked = torch.cat([attn.q.weight, attn.kv.weight])  # (3Q, C)
    bound = (6 / (3 * Q + C)) ** 0.5
    assert stacked.abs().max() <= bound and stacked.abs().max() > 0.99 * bound
    for w in (attn.q.weight, attn.kv.weight):  # each part spans the shared bound
        assert w.abs().max() > 0.99 * bound


def test_a_forward_keeps_its_plan_per_arch_and_computes_the_same():
    """SuperTransformer.plan keeps what a forward of an arch needs (its skeleton, the shapes by name) for the
    PLANS_KEPT most recent archs: the logits are the same as with the plan rebuilt, at most PLANS_KEPT are kept, and
    extracting a subnet never touches a kept skeleton (it stays on the meta device)."""
    torch.manual_seed(0)
    space = SPACES["tiny"]
    model = SuperTransformer(space, SRC_V, TGT_V).eval()
    src, tgt_in = batch()
    rng = random.Random(0)
    archs = [space.largest(), space.smallest()] + [space.sample(rng) for _ in range(mos.PLANS_KEPT + 3)]
    for arch in archs:
        kept = model(src, tgt_in, arch)
        model.plans.clear()
        assert torch.equal(kept, model(src, tgt_in, arch))
    model.plans.clear()
    for arch in archs:
        model(src, tgt_in, arch)
        model.subnet(arch)
    assert len(model.plans) == mos.PLANS_KEPT and archs[-1] in model.plans and archs[0] not in model.plans
    assert all(p.is_meta for skeleton, _ in model.plans.values() for p in skeleton.parameters())
