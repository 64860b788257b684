"""Probe heads on a frozen LV-MAE encoder (docs/EVAL.md).

- ``APHead`` (attentive probe): one ViT block (encoder width, 8 heads, MLP 4) over all encoder
  tokens, LayerNorm, linear classifier on the CLS token. With ``prepend_cls`` (raw-embedding
  baseline) it prepends its own learnable CLS token.
- ``LPHead`` (linear probe): a linear classifier on the mean of the encoder outputs over the real
  segments (the mean is taken when the features are made).

Both hold ``copies`` independent copies of the head, one per (learning rate, weight decay) of a sweep:
every parameter is stacked on a leading dimension of size ``copies`` (all copies start from the same
weights) and ``forward(x, lengths)`` returns ``[copies, B, outputs]``. The copies share each read of
the features and each kernel launch (batched matrix products), so a sweep costs one pass over each
batch. One copy is the ordinary single-head probe. ``per_copy_parameters`` gives the optimiser each
copy's parameters separately.
"""
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models.vision_transformer import Block


def stacked(module, copies):
    """``module``'s parameters, each repeated ``copies`` times on a new leading dimension, named as in
    ``module`` with '.' replaced by '_'."""
    return {name.replace('.', '_'): nn.Parameter(p.detach().expand(copies, *p.shape).clone())
            for name, p in module.named_parameters()}


def linear(x, weight, bias):
    """Per-copy ``F.linear``: ``x [G, B, in]``, ``weight [G, out, in]``, ``bias [G, out]``. Computed as
    ``(weight @ x^T)^T`` so that the weight's gradient comes out in its own layout (no transposed copy)."""
    return torch.baddbmm(bias[:, :, None], weight, x.transpose(1, 2)).transpose(1, 2)


# The released AP builds its block with ``norm_layer=nn.LayerNorm`` and its last norm as ``nn.LayerNorm(dim)``:
# PyTorch's default eps, not the encoder's 1e-6. It matters on inputs of small variance (the raw unit-norm
# embeddings of ``--baseline raw`` have a per-element variance of 1 / width).
HEAD_NORM_EPS = 1e-5


def layer_norm(x, weight, bias, eps=HEAD_NORM_EPS):
    """Per-copy LayerNorm over the last dimension: ``x [G, ..., E]``, ``weight, bias [G, E]``."""
    shape = (x.shape[0],) + (1,) * (x.dim() - 2) + (x.shape[-1],)
    return F.layer_norm(x, x.shape[-1:], eps=eps) * weight.view(shape) + bias.view(shape)


class APHead(nn.Module):
    """A timm ``Block`` (qkv bias, LayerNorm eps 1e-5 as released, GELU MLP) over all tokens, LayerNorm, linear
    classifier on the CLS token; initialised as those timm modules are (the block's ``attn.qkv`` is
    kept as its three parts ``attn_{q,k,v}_{weight,bias}``; the key bias adds the same to every score
    of a query, so it cancels in the softmax and gets no gradient).

    Only the block's output at the CLS token is used, so only that token's query is computed, and
    the key/value projections are folded into it: with ``n = LayerNorm(x)`` (no affine), the score
    of token j is ``q . Wk (g * n_j) + const`` and the attention output ``Wv (g * sum_j a_j n_j + b) + bv``
    (``g, b`` = norm1's affine; the weights ``a`` sum to 1). This equals ``Block(x)[:, 0]`` exactly
    (tested) but costs O(heads * T * E + E^2) per video instead of O(T * E^2), which is what makes
    the cached probe fast; the normalised tokens ``n`` are computed once for all copies. Padding
    (positions ``>= lengths``) takes no part in the attention."""

    def __init__(self, dim, num_outputs, num_heads=8, prepend_cls=False, copies=1):
        super().__init__()
        self.num_heads, self.copies, self.prepend_cls = num_heads, copies, prepend_cls
        block = Block(dim, num_heads, mlp_ratio=4., qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=HEAD_NORM_EPS))
        modules = {'': block, 'norm.': nn.LayerNorm(dim, eps=HEAD_NORM_EPS), 'head.': nn.Linear(dim, num_outputs)}
        params = {prefix.replace('.', '_') + k: p
                  for prefix, m in modules.items() for k, p in stacked(m, copies).items()}
        for kind in ('weight', 'bias'):
            for part, value in zip('qkv', params.pop(f'attn_qkv_{kind}').chunk(3, dim=1)):
                params[f'attn_{part}_{kind}'] = nn.Parameter(value.clone())
        if prepend_cls:
            params['cls_token'] = nn.Parameter(nn.init.normal_(torch.zeros(1, dim), std=.02).expand(copies, -1).clone())
        self.p = nn.ParameterDict(params)

    def forward(self, x, lengths):
        p, G, H = self.p, self.copies, self.num_heads
        B, T, E = x.shape
        C = E // H
        # token 0 (the CLS: the encoder's, or this head's own) is the query; the others are shared by all copies
        if self.prepend_cls:
            x0, rest, rest_len = p['cls_token'][:, None].expand(G, B, E), x, lengths
        else:
            x0, rest, rest_len = x[:, 0].expand(G, B, E), x[:, 1:], lengths - 1
        n0 = F.layer_norm(x0, (E,), eps=HEAD_NORM_EPS)[:, None]                   # [G, 1, B, E]
        n = F.layer_norm(rest, (E,), eps=HEAD_NORM_EPS)                            # [B, T', E]
        g, b = p['norm1_weight'][:, None, None], p['norm1_bias'][:, None, None]    # [G, 1, 1, E]
        # per (copy, head) batched products, laid out [G, H, B, .] so that each weight's gradient comes
        # out in the weight's own layout (no copies)
        q = linear(layer_norm(x0, p['norm1_weight'], p['norm1_bias']), p['attn_q_weight'], p['attn_q_bias'])
        q = q.view(G, B, H, C).transpose(1, 2).reshape(G * H, B, C)
        u = torch.bmm(q, p['attn_k_weight'].view(G * H, C, E)).view(G, H, B, E) * g * C ** -0.5
        pad = torch.arange(n.shape[1], device=x.device)[None] >= rest_len[:, None]
        scores = torch.cat([(u * n0).sum(-1, keepdim=True),
                            torch.einsum('ghbe,bte->ghbt', u, n).masked_fill(pad, float('-inf'))], -1)
        a = scores.softmax(-1)                                                     # [G, H, B, 1 + T']
        z = (a[..., :1] * n0 + torch.einsum('ghbt,bte->ghbe', a[..., 1:], n)) * g + b
        o = torch.baddbmm(p['attn_v_bias'].view(G * H, C, 1), p['attn_v_weight'].view(G * H, C, E),
                          z.view(G * H, B, E).transpose(1, 2))                    # [G * H, C, B]
        o = o.view(G, H, C, B).permute(0, 3, 1, 2).reshape(G, B, E)
        c = x0 + linear(o, p['attn_proj_weight'], p['attn_proj_bias'])
        h = F.gelu(linear(layer_norm(c, p['norm2_weight'], p['norm2_bias']), p['mlp_fc1_weight'], p['mlp_fc1_bias']))
        c = c + linear(h, p['mlp_fc2_weight'], p['mlp_fc2_bias'])
        return linear(layer_norm(c, p['norm_weight'], p['norm_bias']), p['head_weight'], p['head_bias'])


class LPHead(nn.Module):
    """Linear classifier on the pooled features (``x [B, 1, E]``); initialised as ``nn.Linear``."""

    def __init__(self, dim, num_outputs, copies=1):
        super().__init__()
        self.copies = copies
        self.p = nn.ParameterDict({'head_' + k: v for k, v in stacked(nn.Linear(dim, num_outputs), copies).items()})

    def forward(self, x, lengths):
        return torch.einsum('be,goe->gbo', x[:, 0], self.p['head_weight']) + self.p['head_bias'][:, None]


def make_head(probe, dim, num_outputs, head_num_heads=8, prepend_cls=False, copies=1):
    """The head of probe 'ap' or 'lp' (``prepend_cls``: AP on raw embeddings, which have no CLS)."""
    if probe == 'ap':
        return APHead(dim, num_outputs, head_num_heads, prepend_cls=prepend_cls, copies=copies)
    return LPHead(dim, num_outputs, copies=copies)


def per_copy_parameters(head):
    """For each copy ``g``, its parameters as leaf views of slice ``g`` of the stacked parameters; after
    each backward pass, slice ``g`` of the stacked gradient becomes their ``.grad``, or is added to it
    (backward passes accumulate, as into ``.grad``, until the optimiser's ``zero_grad``; the stacked
    ``.grad`` is then cleared). An optimiser with one parameter group per copy (each with its own
    learning rate and weight decay) thus updates the stacked parameters in place, without copies. Call it
    once per head; clear the gradients with the optimiser's ``zero_grad``."""
    params = list(head.parameters())
    views = [[p.detach()[g] for p in params] for g in range(head.copies)]

    def hand_over(i, p):
        for g in range(head.copies):
            view = views[g][i]
            if view.grad is None:
                view.grad = p.grad[g]
            else:
                view.grad.add_(p.grad[g])
        p.grad = None

    for i, p in enumerate(params):
        p.register_post_accumulate_grad_hook(partial(hand_over, i))
    return views
