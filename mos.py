"""
Mixture-of-Supernets (MoS) for machine translation, in one file.

Paper: Jawahar et al., "Mixture-of-Supernets: Improving Weight-Sharing Supernet Training with
Architecture-Routed Mixture-of-Experts", Findings of ACL 2024, arXiv 2306.04845. It builds on HAT
(Wang et al., "HAT: Hardware-Aware Transformers for Efficient Natural Language Processing", ACL 2020).

The method in a few lines:
1. A *supernet* is one large encoder-decoder Transformer. A *subnet* (an `ArchConfig`: embedding widths,
   per-layer FFN widths and head counts, decoder depth, cross-attention spans) is cut out of it.
2. HAT weight sharing: every weight of a subnet is the front corner of the supernet's weight, W[:out, :in].
3. MoS: the two FFN matrices of every layer are instead a *mixture of E experts*,
   W(a) = sum_i alpha_i(a) * E_i[:out, :in], where alpha(a) comes from a small *router* MLP that reads
   the architecture a itself (`arch_features`). Layer-wise MoS: one alpha per expert per layer.
   Neuron-wise MoS: one alpha per expert per output neuron. With one expert alpha = 1: exactly HAT.
4. For a fixed arch the router output is a constant, so a subnet is just a plain `Transformer` whose
   weights the supernet computes (`SuperTransformer.subnet_weights`). The supernet's forward runs that
   plain Transformer on those weights, so training, extraction (`subnet`), latency and decoding all
   share one forward implementation, and the extracted subnet costs nothing extra at inference.

Shape legend: B batch, S source length, T target length, C model width, F FFN width, h heads,
D head width (= qkv_dim / h), E experts, V vocabulary, K beam size, N router input features.
"""

import math
import random
from collections import OrderedDict
from dataclasses import dataclass, fields
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F

from data.batching import BOS, EOS, PAD, UNK  # special-token ids, as every vocabulary is written
from runs.settings import check_arch, check_fields

ROUTER_DROPOUT = 0.1  # the MoS code's router "neuronrouting_jack_drop_2L": dropout 0.1 between its two layers
REPRESENTATIVE_SPAN = 2  # HAT/MoS's largest and smallest subnets attend to the last two encoder layers
PLANS_KEPT = 16  # the supernet keeps what a forward of each of the most recent archs needs (SuperTransformer.plan)

# -----------------------------------------------------------------------------
# Architectures and search spaces


@dataclass(frozen=True)
class ArchConfig:
    """One subnet. Per-layer tuples hold one value per *active* layer. Frozen, so it can key a cache."""
    enc_embed_dim: int
    enc_layers: int
    enc_ffn_dims: tuple
    enc_heads: tuple
    dec_embed_dim: int
    dec_layers: int
    dec_ffn_dims: tuple
    dec_heads: tuple  # decoder self-attention heads
    dec_cross_heads: tuple  # encoder-decoder attention heads
    dec_cross_spans: tuple  # layer i attends to the last `span` encoder outputs (HAT's -1/1/2 = span 1/2/3)

    def to_dict(self):
        """A JSON-ready dict (tuples become lists)."""
        return {f.name: list(v) if isinstance(v, tuple) else v for f in fields(self) for v in [getattr(self, f.name)]}

    @classmethod
    def from_dict(cls, d):
        """Build from a dict such as a JSON arch file; wrong keys or types raise a one-line ValueError
        (runs.settings.check_fields)."""
        return cls(**check_fields(cls, d, "arch"))


@dataclass(frozen=True)
class SearchSpace:
    """The allowed choices for every ArchConfig field. The supernet's sizes are the largest choices."""
    name: str
    enc_embed_dims: tuple
    dec_embed_dims: tuple
    enc_ffn_dims: tuple
    dec_ffn_dims: tuple
    enc_heads: tuple
    dec_heads: tuple
    dec_cross_heads: tuple
    enc_layers: tuple
    dec_layers: tuple
    cross_spans: tuple
    qkv_dim: int  # fixed q/k/v width (HAT): heads change only the head width D = qkv_dim / h

    def choices(self):
        """ArchConfig field -> allowed values (per-layer fields: allowed values of each element)."""
        return dict(enc_embed_dim=self.enc_embed_dims, enc_layers=self.enc_layers, enc_ffn_dims=self.enc_ffn_dims,
                    enc_heads=self.enc_heads, dec_embed_dim=self.dec_embed_dims, dec_layers=self.dec_layers,
                    dec_ffn_dims=self.dec_ffn_dims, dec_heads=self.dec_heads, dec_cross_heads=self.dec_cross_heads,
                    dec_cross_spans=self.cross_spans)

    def sample(self, rng: random.Random) -> ArchConfig:
        """Uniform over every choice, independently per layer (HAT's sampler)."""
        n_enc, n_dec = rng.choice(self.enc_layers), rng.choice(self.dec_layers)
        per_layer = lambda options, n: tuple(rng.choice(options) for _ in range(n))  # one draw per layer
        spans = [s for s in self.cross_spans if s <= n_enc]  # cannot attend to more layers than exist
        return ArchConfig(enc_embed_dim=rng.choice(self.enc_embed_dims), enc_layers=n_enc,
                          enc_ffn_dims=per_layer(self.enc_ffn_dims, n_enc), enc_heads=per_layer(self.enc_heads, n_enc),
                          dec_embed_dim=rng.choice(self.dec_embed_dims), dec_layers=n_dec,
                          dec_ffn_dims=per_layer(self.dec_ffn_dims, n_dec), dec_heads=per_layer(self.dec_heads, n_dec),
                          dec_cross_heads=per_layer(self.dec_cross_heads, n_dec),
                          dec_cross_spans=per_layer(spans, n_dec))

    def _extreme(self, pick) -> ArchConfig:
        """Every choice at pick(choices), each decoder layer attending to the last REPRESENTATIVE_SPAN encoder
        layers: max gives the largest subnet, min the smallest."""
        n_enc, n_dec = pick(self.enc_layers), pick(self.dec_layers)
        span = min(REPRESENTATIVE_SPAN, n_enc)
        return ArchConfig(enc_embed_dim=pick(self.enc_embed_dims), enc_layers=n_enc,
                          enc_ffn_dims=(pick(self.enc_ffn_dims),) * n_enc, enc_heads=(pick(self.enc_heads),) * n_enc,
                          dec_embed_dim=pick(self.dec_embed_dims), dec_layers=n_dec,
                          dec_ffn_dims=(pick(self.dec_ffn_dims),) * n_dec, dec_heads=(pick(self.dec_heads),) * n_dec,
                          dec_cross_heads=(pick(self.dec_cross_heads),) * n_dec, dec_cross_spans=(span,) * n_dec)

    def largest(self) -> ArchConfig:
        """Every choice at its maximum, cross-attention spanning the last two encoder layers (HAT's representative
        subnet; not the widest span): the supernet's own shape."""
        return self._extreme(max)

    def smallest(self) -> ArchConfig:
        """Every choice at its minimum, cross-attention spanning the last two encoder layers (HAT's representative
        subnet; the all-minimum, fastest arch is latency.fastest_arch)."""
        return self._extreme(min)

    def middle(self) -> ArchConfig:
        """The upper median choice of every field (of two choices, the larger: on a space of two-choice fields this
        is `largest`): with largest and smallest, the representative subnets."""
        return self._extreme(lambda options: sorted(options)[len(options) // 2])

    def validate(self, arch: ArchConfig) -> ArchConfig:
        """Return arch if every field is a choice of this space, else raise a one-line ValueError naming the first
        field outside it (arch files are user input: runs.settings.check_arch)."""
        return check_arch(arch, self)

    def position_widths(self):
        """The widths at which sinusoidal positions are built (HAT: the supernet's), for encoder and decoder."""
        return max(self.enc_embed_dims), max(self.dec_embed_dims)

    def to_dict(self):
        """A JSON-ready dict (tuples become lists), as stored in checkpoints."""
        return {f.name: list(v) if isinstance(v, tuple) else v for f in fields(self) for v in [getattr(self, f.name)]}

    @classmethod
    def from_dict(cls, d):
        """The inverse of to_dict."""
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


SPACES = {
    # HAT's IWSLT14 De-En space (HAT space1.yml = MoS space0.yml), exactly.
    "iwslt14": SearchSpace("iwslt14", enc_embed_dims=(640, 512), dec_embed_dims=(640, 512),
                           enc_ffn_dims=(2048, 1024, 512), dec_ffn_dims=(2048, 1024, 512), enc_heads=(4, 2),
                           dec_heads=(4, 2), dec_cross_heads=(4, 2), enc_layers=(6,), dec_layers=(1, 2, 3, 4, 5, 6),
                           cross_spans=(1, 2, 3), qkv_dim=512),
    # The same space scaled down for a 2-core CPU: embeddings {256, 192} (HAT: {640, 512}), FFN 4x/2x/1x the larger
    # embedding (HAT: 3.2x/1.6x/0.8x), q/k/v 256 (HAT: 512), half the depth. The largest subnet then trains at a
    # few thousand tokens/s on 2 cores, so a sandwich-rule supernet fits in an hour on Multi30k.
    "cpu": SearchSpace("cpu", enc_embed_dims=(256, 192), dec_embed_dims=(256, 192), enc_ffn_dims=(1024, 512, 256),
                       dec_ffn_dims=(1024, 512, 256), enc_heads=(4, 2), dec_heads=(4, 2), dec_cross_heads=(4, 2),
                       enc_layers=(3,), dec_layers=(1, 2, 3), cross_spans=(1, 2, 3), qkv_dim=256),
    # The `cpu` space widened downward so that subnets differ (the gap experiment): embeddings down to 64,
    # FFN down to 128, a 128-wide q/k/v and decoder depth 1-4. Trained standalone on Multi30k (the calibration,
    # experiments/results/calibration_cpu_wide): largest 35.26 test BLEU, smallest 29.45; latency 7.2-7.7x apart
    # under HAT's protocol, 3.5-4.4x under the real beam search, whose per-step cost is most of the smallest's time
    # (AVX2 EPYC, 2 threads).
    "cpu_wide": SearchSpace("cpu_wide", enc_embed_dims=(256, 192, 128, 64), dec_embed_dims=(256, 192, 128, 64),
                            enc_ffn_dims=(1024, 512, 256, 128), dec_ffn_dims=(1024, 512, 256, 128), enc_heads=(4, 2),
                            dec_heads=(4, 2), dec_cross_heads=(4, 2), enc_layers=(3,), dec_layers=(1, 2, 3, 4),
                            cross_spans=(1, 2, 3), qkv_dim=128),
    # A toy space for tests and the file-free demo (the synthetic reversal task): trains in seconds.
    "tiny": SearchSpace("tiny", enc_embed_dims=(64, 48), dec_embed_dims=(64, 48), enc_ffn_dims=(128, 64),
                        dec_ffn_dims=(128, 64), enc_heads=(4, 2), dec_heads=(4, 2), dec_cross_heads=(4, 2),
                        enc_layers=(2,), dec_layers=(1, 2), cross_spans=(1, 2), qkv_dim=64),
}


# -----------------------------------------------------------------------------
# MoS: the FFN weights of a subnet are a mixture of expert slices, mixed by a router that reads the arch


FEATURE_NAMES = ("enc_embed_dim", "enc_layers", "enc_ffn_dim_mean", "enc_heads_mean", "dec_embed_dim",
                 "dec_layers", "dec_ffn_dim_mean", "dec_heads_mean", "dec_cross_heads_mean", "dec_cross_span_mean")


def arch_features(arch: ArchConfig, space: SearchSpace) -> torch.Tensor:
    """Enc(a), the router's input (MoS paper, Sec. 3): HAT's 10 aggregate architecture features, each
    divided by its largest value in this space (not by hard-coded constants), so each lies in (0, 1]."""
    mean = lambda xs: sum(xs) / len(xs)
    raw = (arch.enc_embed_dim, arch.enc_layers, mean(arch.enc_ffn_dims), mean(arch.enc_heads), arch.dec_embed_dim,
           arch.dec_layers, mean(arch.dec_ffn_dims), mean(arch.dec_heads), mean(arch.dec_cross_heads),
           mean(arch.dec_cross_spans))
    largest = (max(space.enc_embed_dims), max(space.enc_layers), max(space.enc_ffn_dims), max(space.enc_heads),
           max(space.dec_embed_dims), max(space.dec_layers), max(space.dec_ffn_dims), max(space.dec_heads),
           max(space.dec_cross_heads), max(space.cross_spans))
    return torch.tensor([r / t for r, t in zip(raw, largest)])  # (N,)


def front_slice(weight: torch.Tensor, shape) -> torch.Tensor:
    """HAT's weight-sharing rule: a subnet's tensor is the front corner of the supernet's, W[:out, :in]."""
    return weight[tuple(slice(0, n) for n in shape)]


class Router(nn.Module):
    """The MoS router: Linear -> ReLU -> Dropout(0.1) -> Linear. It returns logits; the caller takes the softmax
    over experts. Only the first `n_out` outputs are computed, so the last layer is itself weight-shared."""

    def __init__(self, n_features, hidden, max_out):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(n_features, hidden), nn.Linear(hidden, max_out)

    def forward(self, features, n_out, training):
        h = F.dropout(F.relu(self.fc1(features)), ROUTER_DROPOUT, training)  # (hidden,)
        return F.linear(h, self.fc2.weight[:n_out], self.fc2.bias[:n_out])  # (n_out,)


class MixtureFFN(nn.Module):
    """Storage for one layer's FFN in the supernet: E stacked experts per linear and their router(s).
    It never sees activations: `weights(features, dim, ffn_dim, training)` returns one subnet's plain fc1/fc2
    weights and biases.
    router='none': one expert, plain HAT sharing. 'layer': one router per layer, alpha (E,) shared by fc1 and
    fc2. 'neuron': one router per linear (fc1_router, fc2_router), alpha (out, E), a separate mixture for every
    output neuron.
    With one expert both MoS modes reduce exactly to HAT (the softmax over one expert is 1)."""

    def __init__(self, max_dim, max_ffn, num_experts=2, router="neuron", router_hidden=128,
                 n_features=len(FEATURE_NAMES)):
        super().__init__()
        if router not in ("none", "layer", "neuron"):
            raise ValueError(f"router = {router!r}; choose 'none', 'layer' or 'neuron'")
        if router == "none" and num_experts != 1:
            raise ValueError(f"router = 'none' with num_experts = {num_experts}: plain weight sharing has exactly "
                             f"one expert; pass num_experts=1 or router='layer'/'neuron'")
        E, self.router_mode = num_experts, router
        self.fc1_weight = nn.Parameter(torch.empty(E, max_ffn, max_dim))  # (E, F_max, C_max)
        self.fc1_bias = nn.Parameter(torch.zeros(E, max_ffn))  # (E, F_max)
        self.fc2_weight = nn.Parameter(torch.empty(E, max_dim, max_ffn))  # (E, C_max, F_max)
        self.fc2_bias = nn.Parameter(torch.zeros(E, max_dim))  # (E, C_max)
        for w in (*self.fc1_weight, *self.fc2_weight):  # each expert: xavier on the full super-sized matrix (HAT)
            nn.init.xavier_uniform_(w)
        if router == "layer":
            self.router = Router(n_features, router_hidden, E)
        elif router == "neuron":
            self.fc1_router = Router(n_features, router_hidden, E * max_ffn)
            self.fc2_router = Router(n_features, router_hidden, E * max_dim)
            for r in (self.fc1_router, self.fc2_router):  # MoS: the sliced last layer starts at xavier, bias 0
                nn.init.xavier_uniform_(r.fc2.weight)
                nn.init.zeros_(r.fc2.bias)

    def alphas(self, features, dim, ffn_dim, training):
        """Mixing weights for fc1 and fc2: (E,) each (layer-wise) or (F, E) and (C, E) (neuron-wise)."""
        E = self.fc1_weight.size(0)
        if self.router_mode == "layer":
            alpha = self.router(features, E, training).softmax(-1)  # (E,)
            return alpha, alpha
        # neuron-wise: entries j*E .. j*E+E-1 of the router output belong to output neuron j
        alpha1 = self.fc1_router(features, E * ffn_dim, training).view(ffn_dim, E).softmax(-1)  # (F*E,) -> (F, E)
        alpha2 = self.fc2_router(features, E * dim, training).view(dim, E).softmax(-1)  # (C*E,) -> (C, E)
        return alpha1, alpha2

    def weights(self, features, dim, ffn_dim, training):
        """The subnet's FFN weights: slice every expert to the active (F, C) corner, then mix (MoS Eq. 1-2)."""
        w1, b1 = self.fc1_weight[:, :ffn_dim, :dim], self.fc1_bias[:, :ffn_dim]  # (E, F, C), (E, F)
        w2, b2 = self.fc2_weight[:, :dim, :ffn_dim], self.fc2_bias[:, :dim]  # (E, C, F), (E, C)
        if self.router_mode == "none":
            return {"fc1.weight": w1[0], "fc1.bias": b1[0], "fc2.weight": w2[0], "fc2.bias": b2[0]}
        alpha1, alpha2 = self.alphas(features, dim, ffn_dim, training)
        per_neuron = "o" if self.router_mode == "neuron" else ""  # alpha (O, E) per output neuron, or (E,)
        mix = lambda alpha, w: torch.einsum(f"{per_neuron}e,eoi->oi", alpha, w)  # (E, O, I) -> (O, I)
        mix_bias = lambda alpha, b: torch.einsum(f"{per_neuron}e,eo->o", alpha, b)  # (E, O) -> (O,)
        return {"fc1.weight": mix(alpha1, w1), "fc1.bias": mix_bias(alpha1, b1),
                "fc2.weight": mix(alpha2, w2), "fc2.bias": mix_bias(alpha2, b2)}


# -----------------------------------------------------------------------------
# A plain Transformer: what one subnet is. Post-norm, as HAT (and the original Transformer).


def scaled_dropout(p: float, arch: ArchConfig, space: SearchSpace):
    """HAT scales dropout with width: p_a = p * C_a / C_max, separately for encoder and decoder."""
    return p * arch.enc_embed_dim / max(space.enc_embed_dims), p * arch.dec_embed_dim / max(space.dec_embed_dims)


def sinusoids(max_len: int, dim: int) -> torch.Tensor:
    """fairseq's sinusoidal positions, laid out as [sin | cos] halves (not interleaved). HAT builds them at the
    supernet's width and slices the first `dim` channels, so a subnet's positions are a slice of this."""
    half = dim // 2
    inv_freq = torch.exp(torch.arange(half) * -(math.log(10000.0) / (half - 1)))  # (dim/2,)
    angles = torch.arange(max_len)[:, None] * inv_freq[None, :]  # (L, dim/2)
    return torch.cat([angles.sin(), angles.cos()], dim=1)  # (L, dim)


def apply_dropout(x, p: float, training: bool):
    """Inverted dropout, F.dropout(x, p, training): zero each entry with probability p and scale the rest by
    1 / (1 - p). The mask is drawn as uniform >= p, faster on a CPU (tests/test_speed.py checks rate and scale)."""
    if not training or p == 0:
        return x
    return x * (torch.rand(x.shape, device=x.device) >= p) / (1 - p)


def attend(q, k, v, mask=None, causal=False):
    """Attention, softmax(q k^T / sqrt(D)) v, for queries (B, h, T, D) and keys/values (B, h, S, D); mask (B, 1, 1,
    S) or (T, S) is True where attention is allowed; causal: the square causal mask. This is
    F.scaled_dot_product_attention, called on a GPU and without a backward; a CPU that trains runs the formula,
    whose bf16 backward is faster there (tests/test_speed.py checks the two agree for every mask used)."""
    if q.is_cuda or not q.requires_grad:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)  # (B, h, T, D)
    scores = (q * q.size(-1) ** -0.5) @ k.transpose(-2, -1)  # (B, h, T, S)
    if causal:
        mask = torch.ones(scores.shape[-2:], dtype=torch.bool, device=q.device).tril()  # (T, S)
    if mask is not None:
        scores = scores.masked_fill(~mask, -math.inf)
    return scores.softmax(-1) @ v  # (B, h, T, D)


class Attention(nn.Module):
    """Multi-head attention with a fixed q/k/v width (HAT): the head count only changes the head width."""

    def __init__(self, dim, kv_dim, qkv_dim, heads):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, qkv_dim)
        self.kv = nn.Linear(kv_dim, 2 * qkv_dim)  # keys and values in one matmul
        self.out = nn.Linear(qkv_dim, dim)
        if dim == kv_dim:  # fairseq/HAT: one xavier draw over the stacked q/k/v in_proj (3Q, C), as one matrix
            in_proj = nn.init.xavier_uniform_(torch.empty(3 * qkv_dim, dim))  # (3Q, C)
            with torch.no_grad():
                self.q.weight.copy_(in_proj[:qkv_dim])
                self.kv.weight.copy_(in_proj[qkv_dim:])
        else:  # fairseq with kdim != embed_dim: separate q, k and v projections, each its own xavier draw
            nn.init.xavier_uniform_(self.q.weight)
            for w in self.kv.weight.data.chunk(2):  # (Q, C_kv) each: k, then v
                nn.init.xavier_uniform_(w)
        nn.init.xavier_uniform_(self.out.weight)
        for lin in (self.q, self.kv, self.out):
            nn.init.zeros_(lin.bias)

    def project_kv(self, memory):
        """Keys and values of `memory` (B, S, C) -> two (B, h, S, D) tensors."""
        B, S, _ = memory.shape
        k, v = self.kv(memory).view(B, S, 2, self.heads, -1).permute(2, 0, 3, 1, 4)  # (2, B, h, S, D)
        return k, v

    def forward(self, x, k, v, mask=None, causal=False):
        """x (B, T, C) attends to keys/values (B, h, S, D); mask (B, 1, 1, S) or (T, S) is True where attention is
        allowed; causal: the square causal mask (T = S)."""
        B, T, _ = x.shape
        q = self.q(x).view(B, T, self.heads, -1).transpose(1, 2)  # (B, T, h*D) -> (B, h, T, D)
        y = attend(q, k, v, mask, causal)  # (B, h, T, D)
        return self.out(y.transpose(1, 2).reshape(B, T, -1))  # (B, h, T, D) -> (B, T, h*D) -> (B, T, C)


class FeedForward(nn.Module):
    """The position-wise FFN, fc2(ReLU(fc1(x))). In the supernet these are the weights MoS mixes."""

    def __init__(self, dim, ffn_dim):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, ffn_dim), nn.Linear(ffn_dim, dim)
        for lin in (self.fc1, self.fc2):
            nn.init.xavier_uniform_(lin.weight)
            nn.init.zeros_(lin.bias)

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(x)))


class EncoderLayer(nn.Module):
    """Self-attention then FFN, each followed by dropout, a residual add and LayerNorm (post-norm)."""

    def __init__(self, dim, ffn_dim, heads, qkv_dim, dropout, ffn=FeedForward):
        super().__init__()
        self.self_attn, self.norm1 = Attention(dim, dim, qkv_dim, heads), nn.LayerNorm(dim)
        self.ffn, self.norm2 = ffn(dim, ffn_dim), nn.LayerNorm(dim)
        self.dropout = dropout

    def forward(self, x, mask):
        k, v = self.self_attn.project_kv(x)
        x = self.norm1(x + apply_dropout(self.self_attn(x, k, v, mask), self.dropout, self.training))
        return self.norm2(x + apply_dropout(self.ffn(x), self.dropout, self.training))


class DecoderLayer(nn.Module):
    """Causal self-attention, cross-attention to the last `cross_span` encoder layers, FFN (post-norm)."""

    def __init__(self, dim, enc_dim, ffn_dim, heads, cross_heads, cross_span, qkv_dim, dropout, ffn=FeedForward):
        super().__init__()
        self.self_attn, self.norm1 = Attention(dim, dim, qkv_dim, heads), nn.LayerNorm(dim)
        self.cross_attn, self.norm2 = Attention(dim, enc_dim, qkv_dim, cross_heads), nn.LayerNorm(dim)
        self.ffn, self.norm3 = ffn(dim, ffn_dim), nn.LayerNorm(dim)
        self.cross_span, self.dropout = cross_span, dropout

    def forward(self, x, enc_outs, src_mask, cache=None):
        """x (B, T, C); enc_outs: one (B, S, C_enc) per encoder layer. With a cache (a dict this layer fills),
        x holds only the newest position and earlier keys/values come from the cache."""
        k, v = self.self_attn.project_kv(x)
        if cache is not None and "self" in cache:
            k, v = torch.cat([cache["self"][0], k], 2), torch.cat([cache["self"][1], v], 2)  # (B, h, t+1, D)
        if cache is not None:
            cache["self"] = (k, v)
        T, L = x.size(1), k.size(2)  # new positions, all positions (cached + new)
        if T == L or T == 1:  # no cache (a square causal mask), or one new position (it may see every key)
            y = self.self_attn(x, k, v, causal=T > 1)
        else:  # T new positions after L - T cached ones: new position i sees keys 0 .. L - T + i
            y = self.self_attn(x, k, v, torch.ones(T, L, dtype=torch.bool, device=x.device).tril(L - T))  # (T, L)
        x = self.norm1(x + apply_dropout(y, self.dropout, self.training))
        # HAT's arbitrary encoder-decoder attention: the last `span` encoder outputs, concatenated along time
        if cache is not None and "cross" in cache:
            k, v = cache["cross"]
        else:
            k, v = self.cross_attn.project_kv(torch.cat(enc_outs[-self.cross_span:], dim=1))  # (B, h, span*S, D)
            if cache is not None:
                cache["cross"] = (k.contiguous(), v.contiguous())  # copied once, not at every step
        mask = src_mask.repeat(1, 1, 1, self.cross_span)  # (B, 1, 1, span*S)
        x = self.norm2(x + apply_dropout(self.cross_attn(x, k, v, mask), self.dropout, self.training))
        return self.norm3(x + apply_dropout(self.ffn(x), self.dropout, self.training))


class Transformer(nn.Module):
    """A plain encoder-decoder Transformer of one architecture: a standalone model, or an extracted subnet.
    `ffn` builds each layer's FFN; the supernet passes its expert mixture (`MixtureFFN`) instead."""

    def __init__(self, arch, src_vocab, tgt_vocab, qkv_dim, dropout=(0.0, 0.0), max_len=1024, pos_dims=None,
                 ffn=FeedForward):
        super().__init__()
        Ce, Cd = arch.enc_embed_dim, arch.dec_embed_dim
        pos_dims = pos_dims or (Ce, Cd)  # width at which the sinusoids are built (HAT: the supernet's)
        self.arch, self.max_len, (self.enc_dropout, self.dec_dropout) = arch, max_len, dropout
        self.src_embed = nn.Embedding(src_vocab, Ce, padding_idx=PAD)
        self.tgt_embed = nn.Embedding(tgt_vocab, Cd, padding_idx=PAD)
        self.register_buffer("enc_pos", sinusoids(max_len, pos_dims[0])[:, :Ce].contiguous())  # (L, Ce)
        self.register_buffer("dec_pos", sinusoids(max_len, pos_dims[1])[:, :Cd].contiguous())  # (L, Cd)
        self.encoder = nn.ModuleList(EncoderLayer(Ce, f, h, qkv_dim, self.enc_dropout, ffn)
                                     for f, h in zip(arch.enc_ffn_dims, arch.enc_heads))
        self.decoder = nn.ModuleList(DecoderLayer(Cd, Ce, f, h, ch, s, qkv_dim, self.dec_dropout, ffn)
                                     for f, h, ch, s in zip(arch.dec_ffn_dims, arch.dec_heads, arch.dec_cross_heads,
                                                            arch.dec_cross_spans))
        self.out_proj = nn.Linear(Cd, tgt_vocab, bias=False)  # separate from tgt_embed, as HAT's IWSLT models
        for emb in (self.src_embed, self.tgt_embed, self.out_proj):  # fairseq: N(0, C^-1/2), pad row zero
            nn.init.normal_(emb.weight, std=emb.weight.size(1) ** -0.5)
        with torch.no_grad():
            self.src_embed.weight[PAD].zero_()
            self.tgt_embed.weight[PAD].zero_()

    def encode(self, src):
        """src (B, S) -> (one (B, S, Ce) output per encoder layer, source mask (B, 1, 1, S))."""
        mask = (src != PAD)[:, None, None, :]  # (B, 1, 1, S) True = a real token
        x = self.src_embed(src) * math.sqrt(self.src_embed.embedding_dim) + self.enc_pos[: src.size(1)]
        x = apply_dropout(x, self.enc_dropout, self.training)
        outs = []
        for layer in self.encoder:
            x = layer(x, mask)
            outs.append(x)
        return outs, mask

    def decode(self, tgt_in, enc_outs, src_mask, cache=None):
        """tgt_in (B, T) -> logits (B, T, V). With a cache (dict), tgt_in holds only the new positions."""
        start = cache.setdefault("pos", 0) if cache is not None else 0
        T = tgt_in.size(1)
        x = self.tgt_embed(tgt_in) * math.sqrt(self.tgt_embed.embedding_dim) + self.dec_pos[start:start + T]
        x = apply_dropout(x, self.dec_dropout, self.training)
        for i, layer in enumerate(self.decoder):
            x = layer(x, enc_outs, src_mask, None if cache is None else cache.setdefault(i, {}))
        if cache is not None:
            cache["pos"] = start + T
        return self.out_proj(x)

    def forward(self, src, tgt_in):
        """Teacher-forced logits (B, T, V) for target inputs tgt_in (BOS + y)."""
        enc_outs, mask = self.encode(src)
        return self.decode(tgt_in, enc_outs, mask)


# -----------------------------------------------------------------------------
# The supernet: HAT's shared weights, with MoS's expert mixtures as FFNs


class SuperTransformer(nn.Module):
    """The MoS supernet: the largest Transformer of the space, whose FFNs hold E experts mixed by a router.
    It is stateless: the arch is an argument of every call, never stored on a module."""

    def __init__(self, space: SearchSpace, src_vocab: int, tgt_vocab: int, num_experts=2, router="neuron",
                 router_hidden=128, dropout=0.3, max_len=1024):
        super().__init__()
        self.space, self.src_vocab, self.tgt_vocab = space, src_vocab, tgt_vocab
        self.num_experts, self.router_mode, self.router_hidden = num_experts, router, router_hidden
        self.dropout, self.max_len = dropout, max_len
        mixture = partial(MixtureFFN, num_experts=num_experts, router=router, router_hidden=router_hidden)
        # every shared weight: the largest subnet's Transformer, expert mixtures as FFNs (a container, never called)
        self.shared = Transformer(space.largest(), src_vocab, tgt_vocab, space.qkv_dim, max_len=max_len, ffn=mixture)
        self.plans = OrderedDict()  # arch -> plan(arch), the most recent PLANS_KEPT: derived data, never state

    def init_args(self):
        """The constructor arguments as a plain dict, for checkpoints (the space as a dict too)."""
        return dict(space=self.space.to_dict(), src_vocab=self.src_vocab, tgt_vocab=self.tgt_vocab,
                    num_experts=self.num_experts, router=self.router_mode, router_hidden=self.router_hidden,
                    dropout=self.dropout, max_len=self.max_len)

    def skeleton(self, arch, device="meta") -> Transformer:
        """An uninitialised plain Transformer of this arch (on the meta device: names and shapes only)."""
        with torch.device(device):
            dropout = scaled_dropout(self.dropout, arch, self.space)
            return Transformer(arch, self.src_vocab, self.tgt_vocab, self.space.qkv_dim, dropout, self.max_len,
                               self.space.position_widths())

    def plan(self, arch: ArchConfig) -> tuple:
        """(skeleton, shapes of its non-FFN tensors by name): what a forward of `arch` needs besides weights, kept for
        the PLANS_KEPT most recent archs (frozen, so hashable): the sandwich's largest and smallest recur every step."""
        if self.space.validate(arch) not in self.plans:
            skeleton = self.skeleton(arch)
            self.plans[arch] = skeleton, {n: t.shape for n, t in skeleton.state_dict().items() if ".ffn." not in n}
            if len(self.plans) > PLANS_KEPT:  # (one arch comes in at a time)
                self.plans.popitem(last=False)
        self.plans.move_to_end(arch)
        return self.plans[arch]

    def subnet_weights(self, arch: ArchConfig, deterministic=False) -> dict:
        """Every weight of the subnet `arch`, by name: front slices of the shared weights (HAT), and for the
        FFNs the routed mixture of expert slices (MoS). Differentiable w.r.t. the supernet's parameters."""
        stored = dict(self.shared.named_parameters()) | dict(self.shared.named_buffers())
        weights = {name: front_slice(stored[name], shape) for name, shape in self.plan(arch)[1].items()}
        features = arch_features(arch, self.space).to(self.shared.enc_pos.device)  # (N,), one Enc(a) for all layers
        training = self.training and not deterministic  # router dropout, as in the MoS code
        for side, dim, ffn_dims in (("encoder", arch.enc_embed_dim, arch.enc_ffn_dims),
                                    ("decoder", arch.dec_embed_dim, arch.dec_ffn_dims)):
            for i, ffn_dim in enumerate(ffn_dims):
                mixed = getattr(self.shared, side)[i].ffn.weights(features, dim, ffn_dim, training)
                weights.update({f"{side}.{i}.ffn.{k}": w for k, w in mixed.items()})
        return weights

    def forward(self, src, tgt_in, arch: ArchConfig):
        """Logits (B, T, V) of subnet `arch`: the plain Transformer run on this supernet's weights for arch.
        Why functional_call: the subnet's forward is the plain Transformer's own code, run on weights computed
        here (differentiable, so gradients reach the experts and routers). Training, extraction (`subnet`),
        latency and decoding therefore share one forward, and in eval mode an extracted subnet computes exactly
        this (in training the router's dropout makes every forward draw its own mixture)."""
        subnet = self.plan(arch)[0].train(self.training)  # the arch's skeleton: names and shapes, no weights
        return torch.func.functional_call(subnet, self.subnet_weights(arch), (src, tgt_in), strict=True)

    @torch.no_grad()
    def subnet(self, arch: ArchConfig) -> Transformer:
        """Extract `arch` as a standalone Transformer (its own copies of the mixed, sliced weights)."""
        model = self.skeleton(arch)
        weights = self.subnet_weights(arch, deterministic=True)
        model.load_state_dict({k: w.detach().clone() for k, w in weights.items()}, assign=True)
        return model.train(self.training)


def build(kind: str, args: dict) -> nn.Module:
    """A model from its constructor arguments as checkpoints store them (train.py's model_args): a supernet
    ("supernet") from its init_args(), or a standalone Transformer ("standalone") of args["arch"], built as the
    supernet builds that subnet (`skeleton`): dropout scaled with its width, positions at the supernet's widths."""
    space = SearchSpace.from_dict(args["space"])
    if kind == "supernet":
        return SuperTransformer(**{**args, "space": space})
    arch = ArchConfig.from_dict(args["arch"])
    return Transformer(arch, args["src_vocab"], args["tgt_vocab"], space.qkv_dim,
                       scaled_dropout(args["dropout"], arch, space), args["max_len"], space.position_widths())


# -----------------------------------------------------------------------------
# Decoding: greedy and batched beam search with incremental (cached) decoding


def _max_lengths(src, max_len_a, max_len_b, limit, min_len):
    """Per-sentence output length limit a * src_len + b (EOS included), at least min_len + 1, capped by the
    position table."""
    return (max_len_a * (src != PAD).sum(1) + max_len_b).long().clamp(min_len + 1, limit - 1)  # (B,)


def _step(model, tokens, enc_outs, src_mask, cache, min_len):
    """Log-probabilities (rows, V) of the next token; with a cache only the newest token is computed. EOS is
    forbidden while fewer than min_len tokens were generated (fairseq's --min-len, default 1: no empty output)."""
    logits = model.decode(tokens[:, -1:] if cache is not None else tokens, enc_outs, src_mask, cache)[:, -1]
    lprobs = F.log_softmax(logits.float(), dim=-1)
    lprobs[:, [PAD, BOS]] = -math.inf  # never generated
    if tokens.size(1) - 1 < min_len:  # tokens holds BOS + the tokens generated so far
        lprobs[:, EOS] = -math.inf
    return lprobs


def _force_eos(lprobs, at_limit):
    """Rows that reached their length limit may only emit EOS."""
    eos = lprobs[at_limit, EOS].clone()
    lprobs[at_limit] = -math.inf
    lprobs[at_limit, EOS] = eos


@torch.inference_mode()
def greedy_decode(model, src, max_len_a=1.2, max_len_b=10, min_len=1, use_cache=True):
    """Most likely token at every step. Returns (token lists without EOS, summed log-probabilities (B,))."""
    B = src.size(0)
    enc_outs, src_mask = model.encode(src)
    max_lens = _max_lengths(src, max_len_a, max_len_b, model.max_len, min_len)
    tokens, scores = torch.full((B, 1), BOS, device=src.device), torch.zeros(B, device=src.device)
    done, cache = torch.zeros(B, dtype=torch.bool, device=src.device), {} if use_cache else None
    for t in range(int(max_lens.max())):
        lprobs = _step(model, tokens, enc_outs, src_mask, cache, min_len)  # (B, V)
        _force_eos(lprobs, t == max_lens - 1)
        score, tok = lprobs.max(-1)  # (B,)
        scores += score.masked_fill(done, 0.0)
        tokens = torch.cat([tokens, tok.masked_fill(done, PAD)[:, None]], 1)
        done |= tok == EOS
        if done.all():
            break
    hyps = [[t for t in row[1:].tolist() if t != PAD] for row in tokens]
    return [h[:h.index(EOS)] if EOS in h else h for h in hyps], scores


@torch.inference_mode()
def beam_search(model, src, beam=5, lenpen=1.0, max_len_a=1.2, max_len_b=10, min_len=1, use_cache=True):
    """Batched beam search in the fairseq manner: 2K candidates per step, EOS among the top K ends a hypothesis
    with score logp / len**lenpen, a sentence stops once K hypotheses ended. Returns (best token lists without
    EOS, their normalised scores (B,)). Rows b*K .. b*K+K-1 hold the K beams of sentence b.
    Outputs have at least min_len tokens; max_len_a=0, max_len_b=n, min_len=n-1 forces exactly n decoder steps
    (latency.py times what is deployed that way)."""
    B, K, dev = src.size(0), beam, src.device
    enc_outs, src_mask = model.encode(src)
    expand = torch.arange(B, device=dev).repeat_interleave(K)  # (B*K,) the sentence of each row
    enc_outs, src_mask = [m[expand] for m in enc_outs], src_mask[expand]
    max_lens = _max_lengths(src, max_len_a, max_len_b, model.max_len, min_len)  # (B,)
    T = int(max_lens.max())
    tokens = torch.full((B * K, 1), BOS, device=dev)  # (B*K, t+1) BOS + tokens so far
    scores = torch.full((B, K), -math.inf, device=dev)
    scores[:, 0] = 0.0  # all beams start identical: keep one alive so the first step does not pick duplicates
    best_score = torch.full((B,), -math.inf, device=dev)
    best = torch.full((B, T), PAD, device=dev)  # the best ended hypothesis of each sentence (EOS included)
    n_ended, done = torch.zeros(B, dtype=torch.long, device=dev), torch.zeros(B, dtype=torch.bool, device=dev)
    cache, first = ({} if use_cache else None), torch.arange(B, device=dev)[:, None] * K  # (B, 1) row of beam 0
    for t in range(T):
        lprobs = _step(model, tokens, enc_outs, src_mask, cache, min_len)  # (B*K, V)
        V = lprobs.size(1)
        _force_eos(lprobs, (t == max_lens - 1)[expand])
        cand = (scores[:, :, None] + lprobs.view(B, K, V)).view(B, K * V)  # (B, K*V) score of every extension
        top_scores, top_idx = cand.topk(2 * K, dim=1)  # (B, 2K)
        top_beam, top_tok = top_idx // V, top_idx % V  # (B, 2K) which beam it extends, with which token
        # 1) hypotheses ending with EOS among the K best candidates are finished; keep each sentence's best
        ended = (top_tok[:, :K] == EOS) & (top_scores[:, :K] > -math.inf) & ~done[:, None]  # (B, K)
        norm = (top_scores[:, :K] / (t + 1) ** lenpen).masked_fill(~ended, -math.inf)  # length counts EOS
        cand_best, cand_k = norm.max(1)  # (B,)
        improved = cand_best > best_score
        if improved.any():
            rows = (first[:, 0] + top_beam.gather(1, cand_k[:, None])[:, 0])[improved]
            best[improved, :t] = tokens[rows, 1:]
            best[improved, t] = EOS
            best_score = torch.where(improved, cand_best, best_score)
        n_ended += ended.sum(1)
        done |= (n_ended >= K) | (t == max_lens - 1)
        if done.all():
            break
        # 2) the K best candidates that did not end continue as the new beams
        live = top_scores.masked_fill(top_tok == EOS, -math.inf)
        scores, pick = live.topk(K, dim=1)  # (B, K)
        rows = (first + top_beam.gather(1, pick)).view(-1)  # (B*K,) the row each new beam extends
        tokens = torch.cat([tokens[rows], top_tok.gather(1, pick).view(-1, 1)], 1)
        if cache is not None:  # reorder cached self-attention keys/values; cross keys/values are equal across beams
            for i, layer_cache in cache.items():
                if i != "pos":
                    layer_cache["self"] = tuple(x[rows] for x in layer_cache["self"])
    hyps = [row.tolist() for row in best]
    return [h[:h.index(EOS)] if EOS in h else h for h in hyps], best_score


# -----------------------------------------------------------------------------
# Sizes: a subnet's parameter count


def num_params(arch: ArchConfig, space: SearchSpace, src_vocab: int, tgt_vocab: int, embeddings=True) -> int:
    """Parameter count of a subnet, by formula. HAT's tables exclude the embeddings and output projection."""
    Ce, Cd, Q = arch.enc_embed_dim, arch.dec_embed_dim, space.qkv_dim
    linear = lambda i, o: i * o + o  # weight and bias
    attention = lambda c, kv: linear(c, Q) + linear(kv, 2 * Q) + linear(Q, c)
    ffn = lambda c, f: linear(c, f) + linear(f, c)
    norm = lambda c: 2 * c
    n = sum(attention(Ce, Ce) + ffn(Ce, f) + 2 * norm(Ce) for f in arch.enc_ffn_dims)
    n += sum(attention(Cd, Cd) + attention(Cd, Ce) + ffn(Cd, f) + 3 * norm(Cd) for f in arch.dec_ffn_dims)
    if embeddings:
        n += src_vocab * Ce + 2 * tgt_vocab * Cd  # source and target embeddings, output projection (no bias)
    return n
