"""Does pretraining learn long-range context? Pretrain a small LV-MAE on generated "plot" sequences
(util/plot_sequences.py: the class is the cyclic order of scenes, so pooling cannot find it), then train
an attentive probe on the frozen encoder and compare it with the same probe on an untrained encoder of
the same architecture. Prints one JSON line per (variant, seed).

    python bench/bench_learning.py [--variants release auto ...] [--steps 400] [--seeds 0 1]

Variants (what the encoder adds to each position row before its first block):
  release    the unit-norm embedding (input_scale 1.0, the original release)
  auto       the embedding times sqrt(width / 2) (--input_scale auto)
  scale<X>   the embedding times X
  learned    the embedding times a learned scalar (initialised at 1)
  layernorm  a LayerNorm (affine, learned) of the embedding
  smallpos   the embedding, position table divided by sqrt(width / 2)
The pretraining and probe loops are also used by tests/test_learning.py.
"""
import argparse
import json
import math
import os
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from models_probe import APHead  # noqa: E402
from models_lvmae import LVMAE  # noqa: E402
from util.embeddings import pad_batch  # noqa: E402
from util.plot_sequences import PlotData  # noqa: E402
from util.reconstruction import retrieval_ranks  # noqa: E402

TINY = dict(num_patches=64, depth=2, num_heads=4, decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=4)


class InputTransform(nn.Module):
    """What a variant does to the input embeddings before the encoder's input projection."""

    def __init__(self, proj, variant, dim):
        super().__init__()
        self.proj, self.variant = proj, variant
        self.gain = nn.Parameter(torch.ones(())) if variant == 'learned' else None
        self.norm = nn.LayerNorm(dim) if variant == 'layernorm' else None

    def forward(self, t):
        return self.proj(t * self.gain if self.gain is not None else self.norm(t))


def build(dim, variant='release', seed=0, **kw):
    """A small LV-MAE of the given input variant, initialised from ``seed``."""
    torch.manual_seed(seed)
    cfg = {**TINY, 'input_size': dim, **kw}
    if variant in ('release', 'auto') or variant.startswith('scale'):
        scale = {'release': 1.0, 'auto': 'auto'}.get(variant) or float(variant[len('scale'):])
        return LVMAE(**cfg, input_scale=scale)
    model = LVMAE(**cfg)
    if variant in ('learned', 'layernorm'):
        model.input_proj = InputTransform(model.input_proj, variant, model.input_size)
    elif variant == 'smallpos':
        model.pos_embed.data /= math.sqrt(model.embed_dim / 2)
    else:
        raise ValueError(f'unknown variant {variant!r}')
    return model


def batches(xs, batch_size, rng):
    order = rng.permutation(len(xs))
    for i in range(0, len(order) - batch_size + 1, batch_size):
        yield pad_batch([torch.from_numpy(xs[j]) for j in order[i:i + batch_size]])


def pretrain(model, xs, steps, batch_size=32, lr=1e-3, mask_ratio=0.5, seed=0, warmup=20):
    """AdamW (betas 0.9, 0.95, weight decay 0.05 on matrices) with warmup and cosine decay, random masking."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    other = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    opt = torch.optim.AdamW([{'params': decay, 'weight_decay': 0.05}, {'params': other, 'weight_decay': 0.0}],
                            lr=lr, betas=(0.9, 0.95))
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    model.train()
    step = 0
    while step < steps:
        for x, lengths in batches(xs, batch_size, rng):
            for g in opt.param_groups:
                g['lr'] = lr * min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / steps))
            loss, _, _ = model(x, lengths, mask_ratio=mask_ratio)
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
            if step == steps:
                break
    return model.eval()


@torch.no_grad()
def features(encoder, xs):
    x, lengths = pad_batch([torch.from_numpy(a) for a in xs])
    return encoder.forward_features(x, lengths), lengths + 1


def ap_probe(encoder, train, test, steps=150, lr=1e-3, seed=0):
    """Top-1 % on ``test`` of an attentive probe (models_probe.APHead) trained full-batch on ``train``
    (each ``(list of [L, D] arrays, labels)``) over the frozen encoder's outputs."""
    (ftr, ltr), (fte, lte) = features(encoder, train[0]), features(encoder, test[0])
    ytr, yte = torch.as_tensor(train[1]), torch.as_tensor(test[1])
    torch.manual_seed(seed)
    head = APHead(ftr.shape[-1], int(ytr.max()) + 1, num_heads=4)
    opt = torch.optim.Adam(head.parameters(), lr=lr)
    for _ in range(steps):
        loss = F.cross_entropy(head(ftr, ltr)[0], ytr)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return 100 * (head(fte, lte)[0].argmax(1) == yte).float().mean().item()


@torch.no_grad()
def val_measures(model, xs, mask_ratio=0.5, seed=0):
    """Loss, loss of the mean predictor and retrieval (top-1 %, mean normalised rank) on fixed masks."""
    x, lengths = pad_batch([torch.from_numpy(a) for a in xs])
    g = torch.Generator().manual_seed(seed)
    noise = torch.rand(x.shape[:2], generator=g)
    valid = model.valid_mask(lengths, x.shape[1])
    mask = model.make_mask(x, lengths, mask_ratio, noise=noise) & valid
    _, pred, _ = model(x, lengths, mask=mask)
    mean = x[valid].mean(0)
    ranks = retrieval_ranks(x, pred, mask, valid)
    return {'val_loss': model.forward_loss(x, pred, mask).item(),
            'mean_loss': model.forward_loss(x, mean.expand_as(x), mask).item(),
            'retrieval_top1': 100 * (ranks == 0).float().mean().item(),
            'retrieval_rank': (ranks.float() / (int(valid.sum()) - 1)).mean().item()}


def main(argv=None):
    p = argparse.ArgumentParser('LV-MAE learning measurement on generated plot sequences')
    p.add_argument('--variants', nargs='+', default=['release', 'auto', 'learned', 'layernorm', 'smallpos'])
    p.add_argument('--dim', default=32, type=int)
    p.add_argument('--depth', default=2, type=int)
    p.add_argument('--steps', default=800, type=int)
    p.add_argument('--batch_size', default=16, type=int)
    p.add_argument('--lr', default=3e-3, type=float)
    p.add_argument('--num_pretrain', default=400, type=int)
    p.add_argument('--num_train', default=150, type=int)
    p.add_argument('--num_test', default=150, type=int)
    p.add_argument('--seeds', default=[0, 1], type=int, nargs='+')
    p.add_argument('--threads', default=1, type=int)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    # the data of tests/test_learning.py
    data = PlotData(dim=args.dim, min_len=16, max_len=32, shared=0.5, noise=0.15, min_scene=3, max_scene=5)
    unlabelled = data.videos(args.num_pretrain, 100)[0]
    train, test, val = data.videos(args.num_train, 101), data.videos(args.num_test, 102), data.videos(60, 103)[0]
    for variant in args.variants:
        for seed in args.seeds:
            start = time.time()
            model = build(args.dim, variant, seed, depth=args.depth)
            untrained = ap_probe(model.eval(), train, test, seed=seed)
            before = val_measures(model, val)
            pretrain(model, unlabelled, args.steps, batch_size=args.batch_size, lr=args.lr, seed=seed)
            after = val_measures(model, val)
            print(json.dumps({'variant': variant, 'seed': seed, 'ap_pretrained': round(ap_probe(model, train, test, seed=seed), 1),
                              'ap_untrained': round(untrained, 1),
                              **{k: round(v, 5) for k, v in after.items()},
                              'retrieval_top1_untrained': round(before['retrieval_top1'], 1),
                              'retrieval_rank_untrained': round(before['retrieval_rank'], 4),
                              'steps': args.steps, 'dim': args.dim, 'depth': args.depth,
                              'seconds': round(time.time() - start, 1)}), flush=True)


if __name__ == '__main__':
    main()
