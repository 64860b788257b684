"""LanguageBind's video encoder (its vision tower and projection) in plain PyTorch.

Step 3 embeds segments with this module rather than the ``languagebind`` package's model, whose code
needs ``transformers`` (seconds of start-up, and a shim for every new version of it). It computes what
the package's ``LanguageBindVideo.get_image_features`` computes, L2-normalised, for every variant a
checkpoint's ``config.json`` can select (tests/test_extract.py compares the two, weights copied from
one to the other), and its parameters carry the checkpoint's names, so util/langbind.py loads a
checkpoint strictly.

The architecture (the package's module ``languagebind.video.modeling_video``): a CLIP ViT over each of the
T frames of a segment. Each layer first adds its own temporal embedding to every token and runs a
pre-norm self-attention across the T frames at each token position (residual; no MLP), then the
usual pre-norm spatial attention and MLP over the tokens of each frame. The output is the post-norm
CLS token of each frame, averaged over the frames, projected (no bias) and L2-normalised.
Variants: ``clip_type`` 'vl' (a 2-D patch embedding and one CLS embedding) or 'vl_new' (a 3-D patch
embedding with a time extent of one frame and one CLS embedding per frame); ``lora_r > 0`` (LoRA on
the temporal attention's four projections, as the package adds with ``peft``); ``hidden_act``.
"""
import math
from dataclasses import dataclass, fields
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

ACTIVATIONS = {
    'quick_gelu': lambda x: x * torch.sigmoid(1.702 * x),
    'gelu': F.gelu,
    'gelu_pytorch_tanh': partial(F.gelu, approximate='tanh'),
    'gelu_new': lambda x: 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0)))),
    'relu': F.relu,
    'silu': F.silu,
    'swish': F.silu,
}


@dataclass
class VideoConfig:
    """The vision settings a checkpoint's ``config.json`` holds; defaults are those of the package's
    ``CLIPVisionConfig`` (a saved config may leave out values equal to them)."""
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 32
    hidden_act: str = 'quick_gelu'
    layer_norm_eps: float = 1e-5
    add_time_attn: bool = False
    num_frames: int = 1
    clip_type: str = 'vl'
    tube_size: int = 1
    lora_r: int = 2
    lora_alpha: float = 16
    projection_dim: int = 512  # LanguageBindVideoConfig's, at the top level of config.json

    @classmethod
    def from_dict(cls, d):
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def check(self):
        """The reason this configuration is not a LanguageBind video model we can run, or None."""
        for f in fields(self):   # JSON gives any type: each value must have its field's (bool is no int)
            v, low = getattr(self, f.name), 0 if f.name == 'lora_r' else 1
            if f.type is int and not (type(v) is int and v >= low):
                return f'{f.name} {v!r} (an integer >= {low} is needed)'
            if f.type is float and not (type(v) in (int, float)):
                return f'{f.name} {v!r} (a number is needed)'
            if f.type is str and not isinstance(v, str):
                return f'{f.name} {v!r} (a string is needed)'
        if not self.add_time_attn:
            return 'add_time_attn is false (the package builds no video embeddings without it)'
        if self.clip_type not in ('vl', 'vl_new'):
            return f'clip_type {self.clip_type!r} (known: vl, vl_new)'
        if self.clip_type == 'vl_new' and self.tube_size != 1:
            return f'tube_size {self.tube_size} (the package\'s temporal attention needs 1)'
        if self.hidden_act not in ACTIVATIONS:
            return f'hidden_act {self.hidden_act!r} (known: {", ".join(ACTIVATIONS)})'
        if self.hidden_size % self.num_attention_heads:
            return f'{self.num_attention_heads} heads do not divide hidden_size {self.hidden_size}'
        return None


class LoRALinear(nn.Linear):
    """``nn.Linear`` plus a LoRA update ``lora_B(lora_A(x)) * lora_alpha / r`` (peft's, without dropout:
    inference only)."""

    def __init__(self, dim, r, alpha):
        super().__init__(dim, dim)
        self.lora_A, self.lora_B = nn.Linear(dim, r, bias=False), nn.Linear(r, dim, bias=False)
        self.scaling = alpha / r

    def forward(self, x):
        return super().forward(x) + self.lora_B(self.lora_A(x)) * self.scaling


class Attention(nn.Module):
    def __init__(self, dim, num_heads, lora=None):
        super().__init__()
        self.num_heads = num_heads
        linear = partial(LoRALinear, r=lora[0], alpha=lora[1]) if lora else (lambda d: nn.Linear(d, d))
        self.k_proj, self.v_proj, self.q_proj, self.out_proj = (linear(dim) for _ in range(4))

    def forward(self, x):
        B, L, D = x.shape
        q, k, v = (p(x).view(B, L, self.num_heads, -1).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        o = F.scaled_dot_product_attention(q, k, v, scale=(D // self.num_heads) ** -0.5)
        return self.out_proj(o.transpose(1, 2).contiguous().reshape(B, L, D))


class MLP(nn.Module):
    def __init__(self, dim, hidden, act):
        super().__init__()
        self.fc1, self.fc2, self.act = nn.Linear(dim, hidden), nn.Linear(hidden, dim), ACTIVATIONS[act]

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Layer(nn.Module):
    def __init__(self, c):
        super().__init__()
        D, eps = c.hidden_size, c.layer_norm_eps
        self.temporal_embedding = nn.Parameter(torch.zeros(1, c.num_frames, D))
        self.temporal_layer_norm1 = nn.LayerNorm(D, eps=eps)
        self.temporal_attn = Attention(D, c.num_attention_heads, (c.lora_r, c.lora_alpha) if c.lora_r else None)
        self.layer_norm1, self.self_attn = nn.LayerNorm(D, eps=eps), Attention(D, c.num_attention_heads)
        self.layer_norm2, self.mlp = nn.LayerNorm(D, eps=eps), MLP(D, c.intermediate_size, c.hidden_act)

    def forward(self, x, T):
        """``x [B * T, N, D]``: the tokens of each frame."""
        BT, N, D = x.shape
        if T != 1:
            x = (x.view(-1, T, N, D) + self.temporal_embedding[0, :T, None]).view(BT, N, D)
        across = x.view(-1, T, N, D).transpose(1, 2).reshape(-1, T, D)  # [B * N, T, D]: one token's frames
        across = self.temporal_attn(self.temporal_layer_norm1(across))
        x = x + across.view(-1, N, T, D).transpose(1, 2).reshape(BT, N, D)
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class Embeddings(nn.Module):
    def __init__(self, c):
        super().__init__()
        D, p = c.hidden_size, c.patch_size
        self.new = c.clip_type == 'vl_new'
        if self.new:  # a 3-D patch embedding, one frame deep; a CLS embedding per frame
            self.patch_embedding = nn.Conv3d(c.num_channels, D, (1, p, p), (1, p, p), bias=False)
            self.class_embedding = nn.Parameter(torch.zeros(c.num_frames, D))
        else:
            self.patch_embedding = nn.Conv2d(c.num_channels, D, p, p, bias=False)
            self.class_embedding = nn.Parameter(torch.zeros(D))
        self.position_embedding = nn.Embedding((c.image_size // p) ** 2 + 1, D)

    def forward(self, pixels):
        """``[B, C, T, H, W]`` -> ``[B * T, 1 + patches, D]``."""
        B, C, T, H, W = pixels.shape
        if self.new:
            patches = self.patch_embedding(pixels).flatten(3).permute(0, 2, 3, 1)           # [B, T, hw, D]
            cls = self.class_embedding[None, :, None].expand(B, -1, -1, -1)
            x = torch.cat([cls, patches], dim=2) + self.position_embedding.weight
            return x.reshape(B * T, -1, x.shape[-1])
        frames = pixels.transpose(1, 2).reshape(B * T, C, H, W)
        patches = self.patch_embedding(frames).flatten(2).transpose(1, 2)                    # [B * T, hw, D]
        cls = self.class_embedding.expand(B * T, 1, -1)
        return torch.cat([cls, patches], dim=1) + self.position_embedding.weight


class Encoder(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.layers = nn.ModuleList(Layer(c) for _ in range(c.num_hidden_layers))


class VisionTransformer(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.embeddings = Embeddings(c)
        self.pre_layrnorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)  # the checkpoint's spelling
        self.encoder = Encoder(c)
        self.post_layernorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)

    def forward(self, pixels):
        B, T = pixels.shape[0], pixels.shape[2]
        x = self.pre_layrnorm(self.embeddings(pixels))
        for layer in self.encoder.layers:
            x = layer(x, T)
        return self.post_layernorm(x[:, 0, :]).reshape(B, T, -1).mean(1)


class VideoEncoder(nn.Module):
    """``[B, 3, T, 224, 224]`` frames (the checkpoint's ``num_frames``) -> ``[B, projection_dim]`` unit
    vectors, float32 (the release stored them times ``logit_scale.exp()``; we store the unit vectors)."""

    def __init__(self, config):
        super().__init__()
        reason = config.check()
        if reason:
            raise ValueError(f'not a LanguageBind video model this code runs: {reason}')
        self.config = config
        self.vision_model = VisionTransformer(config)
        self.visual_projection = nn.Linear(config.hidden_size, config.projection_dim, bias=False)

    def forward(self, pixels):
        if pixels.dim() != 5 or pixels.shape[2] != self.config.num_frames:
            raise ValueError(f'expected [B, 3, {self.config.num_frames}, H, W] frames, got {list(pixels.shape)}')
        return F.normalize(self.visual_projection(self.vision_model(pixels)).float(), dim=-1)


@torch.no_grad()
def init_random(model, seed):
    """Random weights from ``seed`` with CLIP's initialisation scales (for tests, demos and timing:
    a random encoder is labelled so wherever its outputs go)."""
    c = model.config
    D, L = c.hidden_size, c.num_hidden_layers
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith('bias') or 'lora_B' in name:  # LoRA starts as a no-op, as peft's
            p.zero_()
        elif 'norm' in name:
            p.fill_(1.0)
        else:
            std = {'class_embedding': D ** -0.5, 'temporal_embedding': D ** -0.5, 'patch_embedding': 0.02,
                   'position_embedding': 0.02, 'out_proj': D ** -0.5, 'fc1': (2 * D) ** -0.5,
                   'fc2': (D ** -0.5) * (2 * L) ** -0.5, 'visual_projection': D ** -0.5}
            scale = next((s for key, s in std.items() if key in name), (D ** -0.5) * (2 * L) ** -0.5)
            p.copy_(torch.randn(p.shape, generator=gen) * scale)
    return model
