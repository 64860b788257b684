"""Probe heads on a frozen LV-MAE encoder (docs/EVAL.md).

- ``APHead`` (attentive probe): one ViT block (encoder width, 8 heads, MLP 4) over all encoder
  tokens, LayerNorm, linear classifier on the CLS token. With ``prepend_cls`` (raw-embedding
  baseline) it prepends its own learnable CLS token.
- ``LPHead`` (linear probe): a linear classifier on the mean of the encoder outputs over the real
  segments (the mean is taken when the features are made).
- ``HeadGrid``: copies of one head, one per (learning rate, weight decay) of a sweep, evaluated in
  one vectorised call (``torch.func.vmap`` over their stacked parameters).
"""
import copy
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models.vision_transformer import Block
from torch.func import functional_call, vmap


class APHead(nn.Module):
    """One timm ``Block`` over all tokens, LayerNorm, linear classifier on the CLS token.

    Only the block's output at the CLS token is used, so only that token's query is computed, and
    the key/value projections are folded into it: with ``n = LayerNorm(x)`` (no affine), the score
    of token j is ``q . Wk (g * n_j) + const`` and the attention output ``Wv (g * sum_j a_j n_j + b) + bv``
    (``g, b`` = norm1's affine; the weights ``a`` sum to 1). This equals ``Block(x)[:, 0]`` exactly
    (tested) but costs O(heads * T * E + E^2) per video instead of O(T * E^2), which is what makes
    the cached probe fast. Padding (positions ``>= lengths``) takes no part in the attention."""

    def __init__(self, dim, num_outputs, num_heads=8, prepend_cls=False):
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim)) if prepend_cls else None
        self.block = Block(dim, num_heads, mlp_ratio=4., qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=1e-6))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, num_outputs)
        if prepend_cls:
            nn.init.normal_(self.cls_token, std=.02)

    def block_cls(self, x, lengths):
        """``self.block(x, mask)[:, 0]`` computed for the CLS query only."""
        blk, attn = self.block, self.block.attn
        B, T, E = x.shape
        H = attn.num_heads
        g, b = blk.norm1.weight, blk.norm1.bias
        n = F.layer_norm(x, (E,), eps=blk.norm1.eps)
        wq, wk, wv = attn.qkv.weight.view(3, H, E // H, E)
        bq, _, bv = attn.qkv.bias.view(3, H, E // H)
        q = torch.einsum('hce,be->bhc', wq, n[:, 0] * g + b) + bq
        u = torch.einsum('bhc,hce->bhe', q, wk) * g * attn.scale
        pad = torch.arange(T, device=x.device)[None] >= lengths[:, None]
        a = torch.einsum('bhe,bte->bht', u, n).masked_fill(pad[:, None], float('-inf')).softmax(-1)
        z = torch.einsum('bht,bte->bhe', a, n) * g + b
        o = torch.einsum('hce,bhe->bhc', wv, z) + bv
        c = x[:, 0] + attn.proj(o.reshape(B, E))
        return c + blk.mlp(blk.norm2(c))

    def forward(self, x, lengths):
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)
            lengths = lengths + 1
        return self.head(self.norm(self.block_cls(x, lengths)))


class LPHead(nn.Module):
    """Linear classifier on the pooled features (``x [B, 1, E]``)."""

    def __init__(self, dim, num_outputs):
        super().__init__()
        self.head = nn.Linear(dim, num_outputs)

    def forward(self, x, lengths):
        return self.head(x[:, 0])


def make_head(probe, dim, num_outputs, head_num_heads=8, prepend_cls=False):
    """The head of probe 'ap' or 'lp' (``prepend_cls``: AP on raw embeddings, which have no CLS)."""
    if probe == 'ap':
        return APHead(dim, num_outputs, head_num_heads, prepend_cls=prepend_cls)
    return LPHead(dim, num_outputs)


class HeadGrid(nn.Module):
    """``n`` copies of ``head`` (same initial weights), each trained with its own hyperparameters.

    ``forward(x, lengths)`` returns ``[n, B, outputs]``: every copy sees the same batch in one call,
    ``vmap`` over the copies' stacked parameters (one batched kernel per layer instead of ``n`` runs).
    With one copy it is the plain head, so a one-combination sweep is the ordinary probe."""

    def __init__(self, head, n):
        super().__init__()
        self.heads = nn.ModuleList(copy.deepcopy(head) for _ in range(n))

    def forward(self, x, lengths):
        if len(self.heads) == 1:
            return self.heads[0](x, lengths)[None]
        params = [dict(h.named_parameters()) for h in self.heads]
        stacked = {k: torch.stack([p[k] for p in params]) for k in params[0]}
        return vmap(lambda p: functional_call(self.heads[0], p, (x, lengths)))(stacked)
