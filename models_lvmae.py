"""LV-MAE: a masked autoencoder over sequences of segment embeddings.

Tokens are the unit-norm embeddings of consecutive 5-second segments of one video. Sequences in a
batch have different lengths: ``x`` is ``[B, L, D]`` with zeros past each video's length and
``lengths`` is ``[B]``. Padding never takes part in attention, the loss or a pool, so a video's
result does not depend on the rest of its batch beyond float rounding. The encoder sees only the
visible tokens, each with the position embedding of its original place; masking, gathering and
restoring are batched.
"""
from functools import partial

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models.vision_transformer import Block


def get_1d_sincos_pos_embed(embed_dim, length, cls_token=False):
    """``[length (+1), embed_dim]`` fixed sine-cosine table as in MAE; the CLS row (row 0) is zero."""
    assert embed_dim % 2 == 0, 'embedding size must be even for sin-cos position embeddings'
    omega = 1.0 / 10000 ** (np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2.0))
    out = np.arange(length, dtype=np.float64)[:, None] * omega[None, :]
    emb = np.concatenate([np.sin(out), np.cos(out)], axis=1)
    if cls_token:
        emb = np.concatenate([np.zeros([1, embed_dim]), emb], axis=0)
    return emb.astype(np.float32)


SEMANTIC_ORDERS = ('keep_changes', 'mask_changes')

# How the per-token losses of a batch become one number. 'batch' (the original release's): the mean
# over all masked tokens of the batch, so a long window weighs more than a short one. 'video': the mean
# over videos of each video's mean over its masked tokens.
LOSS_REDUCTIONS = ('batch', 'video')

# The paper's configuration, written once: LanguageBind Huge embeddings (1024-d), encoder depth 32 /
# 16 heads, decoder 512-d, depth 8, 16 heads, 256 segments (about 21 minutes at 5 s). It gives the
# model's defaults, the pretraining flags' defaults, and what the probes assume for a checkpoint that
# does not say. ``ARCH_KEYS`` are the keyword arguments of ``LVMAE`` that fix its parameters' shapes.
PAPER_CONFIG = dict(num_patches=256, input_size=1024, embed_dim=None, depth=32, num_heads=16, mlp_ratio=4.0,
                    decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16)
ARCH_KEYS = tuple(PAPER_CONFIG)
# Keyword arguments that do not change any parameter's shape but change what the encoder computes: a
# probe must build the encoder with the values stored in the checkpoint's args (1.0 when absent, as
# the original release). ``input_scale`` multiplies the input embeddings before the encoder.
ENCODER_KEYS = ('input_scale',)


def resolve_input_scale(value, embed_dim):
    """``--input_scale``: a positive number, or 'auto' = sqrt(embed_dim / 2), the norm of every row of
    the sin-cos position table (so that a unit-norm embedding and its position weigh the same)."""
    if isinstance(value, str):
        if value.strip().lower() == 'auto':
            return float(np.sqrt(embed_dim / 2))
        try:
            value = float(value)
        except ValueError:
            raise ValueError(f'input_scale must be a positive number or "auto", got {value!r}') from None
    value = float(value)
    if not np.isfinite(value) or value <= 0:
        raise ValueError(f'input_scale must be a positive number or "auto", got {value!r}')
    return value


class LVMAE(nn.Module):
    def __init__(self, num_patches=PAPER_CONFIG['num_patches'], input_size=PAPER_CONFIG['input_size'],
                 depth=PAPER_CONFIG['depth'], num_heads=PAPER_CONFIG['num_heads'],
                 decoder_embed_dim=PAPER_CONFIG['decoder_embed_dim'], decoder_depth=PAPER_CONFIG['decoder_depth'],
                 decoder_num_heads=PAPER_CONFIG['decoder_num_heads'], mlp_ratio=PAPER_CONFIG['mlp_ratio'],
                 norm_layer=partial(nn.LayerNorm, eps=1e-6), norm_pix_loss=False, cos_loss=False,
                 embed_dim=PAPER_CONFIG['embed_dim'], input_scale=1.0, loss_reduction='batch'):
        super().__init__()
        # The encoder width equals the embedding size, as in the original release; a different
        # ``embed_dim`` adds an input projection (``input_proj``) and an output one (in decoder_pred).
        embed_dim = embed_dim or input_size
        self.num_patches, self.input_size, self.embed_dim = num_patches, input_size, embed_dim
        self.norm_pix_loss, self.cos_loss = norm_pix_loss, cos_loss
        if loss_reduction not in LOSS_REDUCTIONS:
            raise ValueError(f'loss_reduction must be one of {LOSS_REDUCTIONS}, got {loss_reduction!r}')
        self.loss_reduction = loss_reduction
        # Input embeddings are multiplied by ``input_scale`` before the encoder (targets stay unit-norm).
        # The release adds a unit-norm embedding to a position row of norm sqrt(embed_dim / 2) (22.6 at
        # 1024): 1.0 keeps that; 'auto' gives both the same norm (docs/PRETRAIN.md has measurements).
        self.input_scale = resolve_input_scale(input_scale, embed_dim)
        # Runtime setting, not part of the configuration: the encoder's visible tokens are padded to a
        # multiple of this (within the sequence length). Few distinct shapes keep GPU kernel plans
        # cached; padding changes no result beyond float rounding (main_pretrain.py --pad_multiple).
        self.pad_multiple = 1

        # encoder
        self.input_proj = nn.Linear(input_size, embed_dim) if embed_dim != input_size else nn.Identity()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim), requires_grad=False)
        self.blocks = nn.ModuleList([
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm_layer) for _ in range(depth)])
        self.norm = norm_layer(embed_dim)

        # decoder
        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim, bias=True)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, decoder_embed_dim), requires_grad=False)
        self.decoder_blocks = nn.ModuleList([
            Block(decoder_embed_dim, decoder_num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm_layer)
            for _ in range(decoder_depth)])
        self.decoder_norm = norm_layer(decoder_embed_dim)
        self.decoder_pred = nn.Linear(decoder_embed_dim, input_size, bias=True)
        self.initialize_weights()

    def initialize_weights(self):
        self.pos_embed.data.copy_(torch.from_numpy(
            get_1d_sincos_pos_embed(self.embed_dim, self.num_patches, cls_token=True)).unsqueeze(0))
        self.decoder_pos_embed.data.copy_(torch.from_numpy(
            get_1d_sincos_pos_embed(self.decoder_pos_embed.shape[-1], self.num_patches, cls_token=True)).unsqueeze(0))
        torch.nn.init.normal_(self.cls_token, std=.02)
        torch.nn.init.normal_(self.mask_token, std=.02)
        self.apply(self._init_weights)

    def _init_weights(self, m):
        if isinstance(m, nn.Linear):
            torch.nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.constant_(m.bias, 0)
        elif isinstance(m, nn.LayerNorm):
            nn.init.constant_(m.bias, 0)
            nn.init.constant_(m.weight, 1.0)

    # ------------------------------------------------------------------ masking
    @staticmethod
    def valid_mask(lengths, L):
        """``[B, L]`` bool, True on the real tokens of each video."""
        return torch.arange(L, device=lengths.device)[None, :] < lengths[:, None]

    @staticmethod
    def num_keep(lengths, mask_ratio):
        """Tokens kept per video: ``int(L * (1 - mask_ratio))``, computed in float64 like Python."""
        return (lengths.double() * (1 - mask_ratio)).long()

    @staticmethod
    def segment_similarity(x):
        """Cosine similarity of each token to the previous one (the first token gets 0)."""
        sim = F.cosine_similarity(x[:, 1:], x[:, :-1], dim=-1)
        return torch.cat([sim.new_zeros(x.shape[0], 1), sim], dim=1)

    def make_mask(self, x, lengths, mask_ratio, semantic=False, noise=None):
        """``[B, L]`` bool, True = masked. Each video keeps ``int(L_i * (1 - mask_ratio))`` tokens.

        Random: the tokens with the lowest ``noise`` (uniform, drawn here if not given) are kept.
        Semantic ('keep_changes', or True): the tokens least similar to their predecessor (change
        points) are kept and the most redundant are masked, as in the released checkpoint.
        'mask_changes': the reverse (the order the paper's text describes).
        """
        B, L = x.shape[:2]
        valid = self.valid_mask(lengths, L)
        if semantic:
            order = 'keep_changes' if semantic is True else semantic
            if order not in SEMANTIC_ORDERS:
                raise ValueError(f'semantic must be False, True or one of {SEMANTIC_ORDERS}, got {semantic!r}')
            score = self.segment_similarity(x.float())
            score = score if order == 'keep_changes' else -score
        else:
            score = torch.rand(B, L, device=x.device) if noise is None else noise.to(x.device).float()
        score = score.masked_fill(~valid, float('inf'))       # padding sorts last
        ids_sorted = torch.argsort(score, dim=1, stable=True)
        rank = torch.argsort(ids_sorted, dim=1)                # rank of each token in the order
        keep = rank < self.num_keep(lengths, mask_ratio)[:, None]
        return valid & ~keep

    # ------------------------------------------------------------------ encoder / decoder
    def _encode(self, tokens, positions, token_valid):
        """Run the encoder on ``tokens [B, K, D]`` placed at ``positions [B, K]`` (0-based segment
        index); ``token_valid [B, K]`` marks real tokens. Returns ``[B, 1 + K, D]`` (CLS first)."""
        x = self.input_proj(tokens * self.input_scale) + self.pos_embed[0, 1:][positions]
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)
        attn_mask = F.pad(token_valid, (1, 0), value=True)[:, None, None, :]
        for blk in self.blocks:
            x = blk(x, attn_mask=attn_mask)
        return self.norm(x)

    def forward_features(self, x, lengths):
        """Encoder output ``[B, 1 + L, D]`` on the whole unmasked sequence (what the probes use)."""
        B, L = x.shape[:2]
        if L > self.num_patches:
            raise ValueError(f'sequence of {L} segments is longer than num_patches={self.num_patches}')
        positions = torch.arange(L, device=x.device).expand(B, L)
        return self._encode(x, positions, self.valid_mask(lengths, L))

    def forward_encoder(self, x, mask, valid):
        """Gather the visible tokens to the front (original order kept) and encode only them.

        Returns the latent ``[B, 1 + K, D]`` with K the largest visible count in the batch (rounded up
        to a multiple of ``pad_multiple``, at most L; the extra tokens are padding), and ``keep [B, L]``
        (True on visible tokens)."""
        keep = valid & ~mask
        n_keep = keep.sum(1)
        m = self.pad_multiple
        K = min(-(-int(n_keep.max()) // m) * m, keep.shape[1])
        # stable sort: visible tokens first, each group in its original order
        ids = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)[:, :K]
        tokens = torch.gather(x, 1, ids[..., None].expand(-1, -1, x.shape[-1]))
        token_valid = torch.arange(K, device=x.device)[None, :] < n_keep[:, None]
        return self._encode(tokens, ids, token_valid), keep

    def forward_decoder(self, latent, keep, valid):
        """Put the visible latents back in their places, a mask token everywhere else, decode.
        Returns ``[B, L, input_size]`` in the original token order."""
        B, L = keep.shape
        y = self.decoder_embed(latent)
        vis = y[:, 1:]
        # slot of each visible token in the gathered list = number of visible tokens before it
        slot = (keep.long().cumsum(1) - 1).clamp(min=0)
        placed = torch.gather(vis, 1, slot[..., None].expand(-1, -1, vis.shape[-1])) if vis.shape[1] else \
            vis.new_zeros(B, L, vis.shape[-1])
        full = torch.where(keep[..., None], placed, self.mask_token.to(y.dtype).expand(B, L, -1))
        full = full + self.decoder_pos_embed[:, 1:L + 1]
        z = torch.cat([y[:, :1] + self.decoder_pos_embed[:, :1], full], dim=1)
        attn_mask = F.pad(valid, (1, 0), value=True)[:, None, None, :]
        for blk in self.decoder_blocks:
            z = blk(z, attn_mask=attn_mask)
        return self.decoder_pred(self.decoder_norm(z))[:, 1:]

    def loss_target(self, x):
        """What a prediction of ``x`` is compared with: ``x`` itself, or with ``norm_pix_loss`` each token
        normalised to zero mean and unit variance over the dimension (as MAE)."""
        if not self.norm_pix_loss:
            return x
        mean, var = x.mean(dim=-1, keepdim=True), x.var(dim=-1, keepdim=True)
        return (x - mean) / (var + 1.e-6) ** .5

    def forward_loss(self, x, pred, mask, reduction=None):
        """Loss on masked tokens only; a token's loss is the MSE over the dimension (or ``1 - cos``).

        ``reduction`` (default: the model's ``loss_reduction``):
          'batch'  the mean over all masked tokens of the batch (the original release's);
          'video'  per video the mean over its masked tokens, then the mean over videos that have some;
          'none'   the per-video means ``[B]``;
          'sum'    ``(sum of the masked tokens' losses, number of masked tokens)``, for reductions
                   over several batches or processes.
        """
        reduction = reduction or self.loss_reduction
        target, pred = self.loss_target(x.float()), pred.float()
        if self.cos_loss:
            per_token = 1 - F.cosine_similarity(pred, target, dim=-1)
        else:
            per_token = ((pred - target) ** 2).mean(dim=-1)
        mask = mask.float()
        if reduction == 'batch':
            return (per_token * mask).sum() / mask.sum().clamp(min=1)
        if reduction == 'sum':
            return (per_token * mask).sum(), mask.sum()
        count = mask.sum(1)
        per_video = (per_token * mask).sum(1) / count.clamp(min=1)
        if reduction == 'none':
            return per_video
        if reduction != 'video':
            raise ValueError(f'unknown reduction {reduction!r}')
        has = (count > 0).float()
        return (per_video * has).sum() / has.sum().clamp(min=1)

    def forward(self, x, lengths, mask_ratio=0.5, mask=None, semantic=False, noise=None):
        """``loss, pred [B, L, input_size], mask [B, L]`` (1 = masked). ``mask`` (1 = masked, 0 =
        kept or padding) overrides the masking; otherwise see ``make_mask``. ``loss`` is reduced as
        ``loss_reduction`` says (by default the mean over all masked tokens of the batch)."""
        B, L = x.shape[:2]
        if L > self.num_patches:
            raise ValueError(f'sequence of {L} segments is longer than num_patches={self.num_patches}')
        lengths = lengths.to(x.device)
        valid = self.valid_mask(lengths, L)
        if mask is None:
            mask = self.make_mask(x, lengths, mask_ratio, semantic, noise)
        mask = mask.to(x.device).bool() & valid
        latent, keep = self.forward_encoder(x, mask, valid)
        pred = self.forward_decoder(latent, keep, valid)
        loss = self.forward_loss(x, pred, mask)
        return loss, pred, mask.float()


def lvmae_paper(**kwargs):
    """The paper's setting (``PAPER_CONFIG``); keyword arguments override it."""
    return LVMAE(**{**PAPER_CONFIG, **kwargs})
