"""gpt-tiny: a small GPT-style language model built from the tensor-parallel layers.

With `tp` a group of one it is an ordinary model; with k ranks each holds 1/k of the attention
heads, MLP columns, vocabulary rows and LM-head rows, and the replicated rest (layer norms,
position embeddings, row-parallel biases).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ps.tp.groups import TPGroup
from ps.tp.layers import ColumnParallelLinear, ParallelMLP, ParallelSelfAttention, VocabParallelEmbedding


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, tp: TPGroup, dropout: float):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = ParallelSelfAttention(dim, heads, tp, attn_dropout=dropout)
        self.mlp = ParallelMLP(dim, 4 * dim, tp)
        self.dropout = dropout

    def forward(self, x: torch.Tensor, gen: torch.Generator | None = None) -> torch.Tensor:
        # residual dropout acts on replicated activations: the shared RNG keeps ranks identical
        x = x + F.dropout(self.attn(self.ln1(x), gen), self.dropout, self.training)
        return x + F.dropout(self.mlp(self.ln2(x)), self.dropout, self.training)


class GPT(nn.Module):
    def __init__(self, vocab: int = 64, seq_len: int = 32, dim: int = 64, layers: int = 2, heads: int = 4,
                 tp: TPGroup | None = None, dropout: float = 0.0, recompute: bool = False):
        super().__init__()
        tp = tp or TPGroup()
        self.tp, self.recompute = tp, recompute
        self.tok = VocabParallelEmbedding(vocab, dim, tp)
        self.pos = nn.Embedding(seq_len, dim)
        nn.init.normal_(self.pos.weight, std=0.02)
        self.blocks = nn.ModuleList(Block(dim, heads, tp, dropout) for _ in range(layers))
        self.ln_f = nn.LayerNorm(dim)
        self.head = ColumnParallelLinear(dim, vocab, tp, bias=False, gather_output=True)
        self._gen: torch.Generator | None = None

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self._gen is None or self._gen.device != ids.device:
            self._gen = self.tp.generator(ids.device)
        x = self.tok(ids) + self.pos(torch.arange(ids.shape[1], device=ids.device))
        for block in self.blocks:
            if self.recompute and self.training:
                x = checkpoint(_replay(block, self._gen), x, use_reentrant=False)
            else:
                x = block(x, self._gen)
        return self.head(self.ln_f(x))

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def _replay(block: Block, gen: torch.Generator):
    """The block as a function whose recomputation in backward draws the same attention-dropout
    masks as its forward did (checkpoint restores only the global RNG): the per-rank RNG is set
    back to where the forward started for the replay, then returned to where it was, so the
    next forward draws fresh masks."""
    state = gen.get_state()
    calls = 0

    def run(x: torch.Tensor) -> torch.Tensor:
        nonlocal calls
        calls += 1
        if calls == 1:  # the forward itself
            return block(x, gen)
        now = gen.get_state()
        gen.set_state(state)
        try:
            return block(x, gen)
        finally:
            gen.set_state(now)

    return run


def gpt_tiny(input_shape=(32,), num_classes: int = 64, tp: TPGroup | None = None, recompute: bool = False) -> GPT:
    """The built-in `--model gpt-tiny`: 2 layers, 4 heads, width 64 (about 110 k parameters)."""
    return GPT(vocab=num_classes, seq_len=int(input_shape[0]), tp=tp, recompute=recompute)
