"""
Token-bucketed batches for the trainer: sentences of similar length packed up to a token budget, then padded.

    from data.batching import TokenBatcher, collate, split_batches
    src, tgt = corpus.splits["train"]                  # data/corpus.py: lists of int arrays, each ending with EOS
    batcher = TokenBatcher([len(s) for s in src], [len(t) for t in tgt], max_tokens=4096, seed=1337)
    for idx in batcher.batches(epoch):
        src_b, tgt_in, tgt_out = collate(src, tgt, idx)   # (B, S), (B, T), (B, T) LongTensors
    batches = split_batches(corpus, "valid", 4096, device)   # a whole split once, in a fixed order (evaluation)

Every sentence is stored as its token ids followed by EOS and without BOS; `collate` adds BOS to the decoder input.
Shape letters: B = sentences in a batch, S = longest source (incl. EOS), T = longest target (incl. EOS).
"""

import numpy as np
import torch

# The special symbols, in id order: every vocabulary starts with them (data/corpus.py), and mos.py imports the ids.
SPECIALS = ("<pad>", "<s>", "</s>", "<unk>")
PAD, BOS, EOS, UNK = range(len(SPECIALS))


class TokenBatcher:
    """fairseq-style batches of sentence indices with at most `max_tokens` (padded) tokens each.

    Sentences are sorted by length (ties broken randomly from seed+epoch) and packed greedily so that
    batch_size * max(longest src, longest tgt) <= max_tokens; the batch order is then shuffled from (seed, epoch).
    With world_size > 1 each rank takes every world_size-th batch; the last len % world_size batches of an epoch's
    shuffled order are dropped so all ranks run the same number of steps (a different few each epoch).
    A single sentence longer than max_tokens raises ValueError naming it: filter it out or raise max_tokens.
    Lengths are the stored lengths, i.e. including EOS."""

    def __init__(self, src_lens, tgt_lens, max_tokens, seed=0, rank=0, world_size=1, shuffle=True):
        assert 0 <= rank < world_size, f"rank {rank} not in [0, {world_size})"
        self.src_lens, self.tgt_lens = np.asarray(src_lens, dtype=np.int64), np.asarray(tgt_lens, dtype=np.int64)
        assert len(self.src_lens) == len(self.tgt_lens), "src_lens and tgt_lens differ in length"
        self.max_tokens, self.seed, self.shuffle = max_tokens, seed, shuffle
        self.rank, self.world_size = rank, world_size
        lens = np.maximum(self.src_lens, self.tgt_lens)  # a sentence pair costs its longer side in the budget
        if len(too_long := np.flatnonzero(lens > max_tokens)):
            i = int(too_long[0])
            raise ValueError(f"sentence {i} has {lens[i]} tokens > max_tokens={max_tokens} "
                             f"({len(too_long)} such sentences): filter them out or raise max_tokens")
        self.lens = lens.tolist()  # plain ints: the packing loop below is pure Python
        self._len = len(self.batches(0))  # the packing depends on lengths only, so it is the same every epoch

    def batches(self, epoch):
        """This rank's batches for `epoch`: a list of lists of sentence indices, deterministic in (seed, epoch)."""
        rng = np.random.default_rng([self.seed, epoch])
        tiebreak = rng.random(len(self.lens)) if self.shuffle else np.arange(len(self.lens))
        order = np.lexsort((tiebreak, self.tgt_lens, self.src_lens))  # by src len, then tgt len, then tiebreak
        batches, batch, width = [], [], 0  # width = longest sentence in the open batch
        for i in order.tolist():
            if batch and (len(batch) + 1) * max(width, self.lens[i]) > self.max_tokens:  # i would overflow
                batches.append(batch)
                batch, width = [], 0
            batch.append(i)
            width = max(width, self.lens[i])
        if batch:
            batches.append(batch)
        if self.shuffle:
            batches = [batches[k] for k in rng.permutation(len(batches))]
        per_rank = len(batches) // self.world_size
        return batches[: per_rank * self.world_size][self.rank :: self.world_size]

    def __len__(self):
        return self._len

    def padding_fraction(self, batches):
        """Share of PAD positions in the collated src + tgt tensors of `batches`."""
        sides = [lens[b] for b in batches for lens in (self.src_lens, self.tgt_lens)]  # every side of every batch
        total = sum(len(side) * int(side.max()) for side in sides)  # positions in the padded tensors
        return (total - sum(int(side.sum()) for side in sides)) / max(total, 1)  # those not holding a token


def collate(src_seqs, tgt_seqs, indices):
    """Pad the chosen sentences into (src, tgt_in, tgt_out) LongTensors. tgt_in = BOS + y without its EOS,
    tgt_out = y with EOS, so tgt_out[:, t] is the token predicted after reading tgt_in[:, :t+1]."""
    srcs, tgts = [src_seqs[i] for i in indices], [tgt_seqs[i] for i in indices]
    B, S, T = len(indices), max(len(s) for s in srcs), max(len(t) for t in tgts)
    src, tgt_in, tgt_out = (np.full((B, L), PAD, dtype=np.int64) for L in (S, T, T))  # (B, S), (B, T), (B, T)
    for b, (s, t) in enumerate(zip(srcs, tgts)):
        src[b, : len(s)] = s
        tgt_in[b, 0], tgt_in[b, 1 : len(t)] = BOS, t[:-1]  # shift right: drop EOS, prepend BOS
        tgt_out[b, : len(t)] = t
    return torch.from_numpy(src), torch.from_numpy(tgt_in), torch.from_numpy(tgt_out)


def split_batches(corpus, split, max_tokens, device, n=None):
    """The first n sentence pairs of a split (all if None), each once, as (src, tgt_in, tgt_out) batches of about
    max_tokens, in a fixed order: train.py's validation and test loss, search.py's fixed fitness subset."""
    src, tgt = (side[:n] for side in corpus.splits[split])
    batcher = TokenBatcher([len(s) for s in src], [len(t) for t in tgt], max_tokens, shuffle=False)
    return [tuple(x.to(device) for x in collate(src, tgt, idx)) for idx in batcher.batches(0)]
