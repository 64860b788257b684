"""Attentive (AP) and linear (LP) probing of a frozen LV-MAE encoder (DESIGN.md section 5).

Shared by ``test_ap_movie_clip.py`` and ``test_lp_movie_clip.py``. For each task
(``<data_path>/<task>/{train,val,test}.csv``; head size from util.tasks, never from the labels of a
split) and each seed: train a head with Adam on train, evaluate val and test after every epoch,
report the test score at the epoch with the best val score (highest top-1, lowest MSE).

- AP: one ViT block (encoder width, 8 heads, MLP 4) over all encoder tokens, LayerNorm, linear
  classifier on the CLS token. LP: linear classifier on the mean of the encoder outputs over the
  real segments. ``--baseline raw``: no encoder, the same heads on the raw segment embeddings (AP
  prepends a learnable CLS token; no position information).
- Feature cache: the encoder is frozen and its input not augmented, so its output is computed once
  per video (in length-sorted batches) and the heads train on that; LP keeps only the mean.
  ``--no_cache`` recomputes the encoder for every batch of every epoch (same result).
- Videos longer than ``num_patches`` segments: the first ``num_patches`` segments are used;
  ``--long_video`` averages the head's outputs over consecutive windows of ``num_patches``.
"""
import argparse
import json
import os
import shutil
import time
from functools import partial

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models.vision_transformer import Block
from torch.utils.tensorboard import SummaryWriter

from models_lvmae import ENCODER_KEYS, LVMAE
from util.checkpoint import checkpoint_args, load_checkpoint, load_model_state, model_state
from util.embeddings import EmbeddingError, load_row, read_csv, read_metadata
from util.fileio import atomic_write_text
from util.tasks import COLUMN_NAMES, GROUPS, LVU_CLASSIFICATION, expand_tasks, get_task

SPLITS = ('train', 'val', 'test')
ARCH_FLAGS = ('input_size', 'num_patches', 'depth', 'num_heads', 'mlp_ratio', 'embed_dim')
DECODER_PREFIXES = ('decoder_', 'mask_token')


def get_args_parser(probe):
    name = {'ap': 'attentive', 'lp': 'linear'}[probe]
    p = argparse.ArgumentParser(f'LV-MAE {name} probing', add_help=True)
    p.add_argument('--task', default=['scene'], nargs='+',
                   help=f'task(s): {", ".join(GROUPS["all"])}, a folder with a task.json under --data_path, '
                        'or a group: lvu (the 9 LVU tasks), all (LVU + breakfast + coin)')
    p.add_argument('--data_path', default='data', help='CSV root of step 4: <data_path>/<task>/{train,val,test}.csv')
    p.add_argument('--resume', default='', help='LV-MAE checkpoint (ours or the original release\'s)')
    p.add_argument('--baseline', default=None, choices=['raw'],
                   help='raw: no encoder, the head on the raw segment embeddings ("LanguageBind + %s")' % probe.upper())
    # optimisation (README defaults; paper: AP lr 1e-3 with --lr_decay 0.9 for 20 epochs, LP lr 1e-4 for 30)
    p.add_argument('--batch_size', default=16, type=int)
    p.add_argument('--epochs', default=30, type=int)
    p.add_argument('--lr', default=3e-4, type=float, help='Adam learning rate')
    p.add_argument('--lr_decay', default=None, type=float,
                   help='ExponentialLR factor per epoch (paper AP: 0.9); default no decay')
    p.add_argument('--weight_decay', default=0.0, type=float)
    p.add_argument('--seeds', default=[0], type=int, nargs='+',
                   help='run each task once per seed (head init and data order); mean and std reported')
    # architecture: default to the checkpoint's (its args, else its parameter shapes)
    p.add_argument('--input_size', default=None, type=int, help='segment embedding size')
    p.add_argument('--num_patches', default=None, type=int, help='longest window in segments (default 256)')
    p.add_argument('--depth', default=None, type=int)
    p.add_argument('--num_heads', default=None, type=int)
    p.add_argument('--mlp_ratio', default=None, type=float)
    p.add_argument('--embed_dim', default=None, type=int, help='encoder width if it differs from --input_size')
    p.add_argument('--head_num_heads', default=8, type=int, help='AP block heads')
    p.add_argument('--long_video', action='store_true',
                   help='average the head over consecutive num_patches windows (default: first window only)')
    # running
    p.add_argument('--no_cache', action='store_true', help='recompute the encoder every epoch (benchmark, tests)')
    p.add_argument('--cache_ram_gb', default=8.0, type=float,
                   help='feature caches larger than this go to a memory-mapped file under --output_dir')
    p.add_argument('--feature_batch_size', default=64, type=int, help='videos per encoder batch when caching')
    p.add_argument('--output_dir', default=f'./output_dir/probe_{probe}', help='log.txt, results.json, results.md')
    p.add_argument('--log_dir', default=None, help='TensorBoard folder (default: <output_dir>/tensorboard)')
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    p.set_defaults(probe=probe)
    return p


# ---------------------------------------------------------------------------------------- encoder
def _checkpoint_arch(ckpt_args, sd):
    """Architecture of a checkpoint: its stored args, else what the parameter shapes say."""
    arch = {k: ckpt_args[k] for k in ARCH_FLAGS if ckpt_args.get(k) is not None}
    if 'pos_embed' in sd:
        arch.setdefault('num_patches', sd['pos_embed'].shape[1] - 1)
        width = sd['pos_embed'].shape[-1]
        arch.setdefault('input_size', sd['input_proj.weight'].shape[1] if 'input_proj.weight' in sd else width)
        if width != arch['input_size']:
            arch.setdefault('embed_dim', width)
    blocks = {int(k.split('.')[1]) for k in sd if k.startswith('blocks.')}
    if blocks:
        arch.setdefault('depth', max(blocks) + 1)
    if 'blocks.0.mlp.fc1.weight' in sd:
        fc1 = sd['blocks.0.mlp.fc1.weight'].shape
        arch.setdefault('mlp_ratio', fc1[0] / fc1[1])
    return arch


def load_encoder(args):
    """Frozen LV-MAE from ``args.resume``; fills the architecture flags of ``args`` (explicit flags
    that contradict the checkpoint are an error)."""
    ckpt = load_checkpoint(args.resume)
    sd = model_state(ckpt)
    ckpt_args = checkpoint_args(ckpt)
    for k, v in _checkpoint_arch(ckpt_args, sd).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    # shape-changing flags are checked by load_model_state (it names the parameters); heads are not
    if ckpt_args.get('num_heads') not in (None, args.num_heads):
        raise ValueError(f'{args.resume}: --num_heads {args.num_heads} but the checkpoint was trained '
                         f'with num_heads={ckpt_args["num_heads"]}')
    if args.num_heads is None:
        print(f'{args.resume}: num_heads not stored in the checkpoint; using the default 16 (set --num_heads)')
    arch = {k: getattr(args, k) for k in ARCH_FLAGS if getattr(args, k) is not None}
    # configuration that changes no shape but what the encoder computes (1.0 when absent, as released)
    model = LVMAE(**arch, **{k: ckpt_args[k] for k in ENCODER_KEYS if ckpt_args.get(k) is not None})
    load_model_state(model, sd, args.resume, strict=True, ignore_prefixes=DECODER_PREFIXES)
    for k in ('input_size', 'num_patches'):
        setattr(args, k, getattr(model, k))
    model.eval().requires_grad_(False)
    return model


class Featurizer:
    """Raw windows ``x [B, L, D], lengths [B]`` -> head input ``(tokens [B, T, E], lengths [B])``:
    the frozen encoder's output (CLS first) for AP, its mean over the real segments (T = 1) for LP.
    ``encoder=None`` (``--baseline raw``) passes the raw embeddings (or their mean)."""

    def __init__(self, encoder, pooled):
        self.encoder, self.pooled = encoder, pooled

    def out_length(self, n):
        return 1 if self.pooled else n + (self.encoder is not None)

    @torch.no_grad()
    def __call__(self, x, lengths):
        if self.encoder is not None:
            # bf16 autocast on GPU (as in pretraining); fp32 on CPU
            with torch.autocast('cuda', dtype=torch.bfloat16, enabled=x.device.type == 'cuda'):
                x = self.encoder.forward_features(x, lengths).float()
            if not self.pooled:
                return x, lengths + 1
            x = x[:, 1:]
        if not self.pooled:
            return x, lengths
        valid = (torch.arange(x.shape[1], device=x.device)[None] < lengths[:, None]).to(x.dtype)
        mean = (x * valid[..., None]).sum(1) / lengths[:, None].to(x.dtype)
        return mean[:, None], torch.ones_like(lengths)


# ---------------------------------------------------------------------------------------- heads
class APHead(nn.Module):
    """One timm ``Block`` over all tokens, LayerNorm, linear classifier on the CLS token.

    Only the block's output at the CLS token is used, so only that token's query is computed, and
    the key/value projections are folded into it: with ``n = LayerNorm(x)`` (no affine), the score
    of token j is ``q . Wk (g * n_j) + const`` and the attention output ``Wv (g * sum_j a_j n_j + b) + bv``
    (``g, b`` = norm1's affine; the weights ``a`` sum to 1). This equals ``Block(x)[:, 0]`` exactly
    (tested) but costs O(heads * T * E + E^2) per video instead of O(T * E^2), which is what makes
    the cached probe fast."""

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


# ---------------------------------------------------------------------------------------- data
class Items:
    """The windows of a split's videos stored flat: ``data [rows, D]``, item ``i`` is
    ``data[start[i]:start[i] + length[i]]`` and belongs to video ``video[i]``. Holds raw windows, or
    (cache) the featurizer's outputs. ``first[v]``/``count[v]``: the items of video ``v``."""

    def __init__(self, data, start, length, video, labels):
        self.data, self.start, self.length, self.video, self.labels = data, start, length, video, labels
        self.count = torch.bincount(video, minlength=len(labels))
        self.first = torch.cumsum(self.count, 0) - self.count

    @classmethod
    def from_videos(cls, seqs, labels, num_patches, long_video):
        wins, video = [], []
        for v, s in enumerate(seqs):
            chunks = s.split(num_patches) if long_video else [s[:num_patches]]
            wins += chunks
            video += [v] * len(chunks)
        length = torch.tensor([w.shape[0] for w in wins])
        return cls(torch.cat(wins), torch.cumsum(length, 0) - length, length, torch.tensor(video), labels)

    def gather(self, items, device):
        """Padded ``x [n, T, D]`` and ``lengths [n]`` of the given items."""
        length = self.length[items]
        T = int(length.max())
        valid = torch.arange(T)[None] < length[:, None]
        idx = (self.start[items][:, None] + torch.arange(T)[None]).where(valid, 0)
        x = self.data[idx.to(self.data.device)].to(device)
        return x * valid[..., None].to(device, x.dtype), length.to(device)

    def batch(self, videos, device):
        """Items of ``videos``: ``x, lengths`` and ``owner`` (position of each item's video in ``videos``)."""
        cnt = self.count[videos]
        owner = torch.repeat_interleave(torch.arange(len(videos)), cnt)
        rank = torch.arange(len(owner)) - (torch.cumsum(cnt, 0) - cnt)[owner]   # index among its video's items
        items = self.first[videos][owner] + rank
        x, lengths = self.gather(items, device)
        return x, lengths, owner.to(device)

    def featurize(self, featurizer, batch_size, device, memmap_path=None):
        """Cache: run ``featurizer`` once over all items (length-sorted batches); ``memmap_path``
        puts the result in a memory-mapped file instead of memory."""
        out_len = torch.tensor([featurizer.out_length(int(n)) for n in self.length])
        start = torch.cumsum(out_len, 0) - out_len
        rows = int(out_len.sum())
        order = torch.argsort(self.length, stable=True)
        data = None
        for i in range(0, len(order), batch_size):
            items = order[i:i + batch_size]
            y, ylen = featurizer(*self.gather(items, device))
            if data is None:
                shape = (rows, y.shape[-1])
                data = torch.from_numpy(np.lib.format.open_memmap(memmap_path, 'w+', np.float32, shape)) \
                    if memmap_path else torch.empty(shape, device=device)
            valid = torch.arange(y.shape[1], device=y.device)[None] < ylen[:, None]
            dst = (start[items].to(y.device)[:, None] + torch.arange(y.shape[1], device=y.device)[None])[valid]
            data[dst.to(data.device)] = y[valid].float().to(data.device)
        return Items(data, start, out_len, self.video, self.labels)


def load_split(csv_path, task, input_size):
    """Embeddings ``[N_i, D]`` and labels of one split; bad rows are errors naming file and row."""
    rows = read_csv(csv_path, label_required=True)
    seqs, labels = [], []
    for r in rows:
        y = r['label']
        if not task.regression and (y != int(y) or not 0 <= y < task.num_classes):
            raise EmbeddingError(f'{csv_path} row {r["row"]} (video {r["video_id"]}): label {y:g} is not a class '
                                 f'id in [0, {task.num_classes}) of task {task.name}')
        seqs.append(load_row(r, input_size, csv_path))
        input_size = seqs[-1].shape[1]
        labels.append(y)
    labels = torch.tensor(labels, dtype=torch.float32 if task.regression else torch.long)
    random_init = any(read_metadata(r['source']).get('random_init') == '1'
                      for r in rows if isinstance(r['source'], str))
    return seqs, labels, random_init


def has_embeddings(csv_path):
    """False when the CSV is missing or none of its rows' embedding files exists."""
    if not os.path.isfile(csv_path):
        return False
    try:
        rows = read_csv(csv_path)
    except EmbeddingError:
        return True  # a broken CSV is reported by load_split
    exists = lambda s: all(map(os.path.isfile, s)) if isinstance(s, list) else os.path.isfile(s)
    return any(exists(r['source']) for r in rows)


# ---------------------------------------------------------------------------------------- train / eval
def head_outputs(head, items, videos, featurizer, device):
    """Head outputs per video (mean over its windows); ``featurizer`` when running uncached."""
    x, lengths, owner = items.batch(videos, device)
    if featurizer is not None:
        x, lengths = featurizer(x, lengths)
    out = head(x, lengths)
    summed = torch.zeros(len(videos), out.shape[1], device=device).index_add(0, owner, out.float())
    return summed / torch.bincount(owner, minlength=len(videos))[:, None]


def loss_fn(out, y, task):
    return F.mse_loss(out[:, 0], y) if task.regression else F.cross_entropy(out, y)


@torch.no_grad()
def evaluate(head, items, task, featurizer, batch_size, device):
    """``(metric, loss)``: top-1 % or MSE over the split."""
    head.eval()
    outs = [head_outputs(head, items, torch.arange(i, min(i + batch_size, len(items.labels))), featurizer, device)
            for i in range(0, len(items.labels), batch_size)]
    out, y = torch.cat(outs), items.labels.to(device)
    loss = loss_fn(out, y, task).item()
    metric = loss if task.regression else (out.argmax(1) == y).float().mean().item() * 100
    return metric, loss


def train_seed(args, task, data, dim, featurizer, seed, log_writer=None, log_file=None):
    """Train one head; returns ``{'seed', 'best_epoch', 'val', 'test', 'epochs': [...]}``."""
    device = args.device
    torch.manual_seed(seed)
    num_out = 1 if task.regression else task.num_classes
    head = APHead(dim, num_out, args.head_num_heads, prepend_cls=args.baseline == 'raw') \
        if args.probe == 'ap' else LPHead(dim, num_out)
    head.to(device)
    opt = torch.optim.Adam(head.parameters(), lr=args.lr, weight_decay=args.weight_decay,
                           fused=torch.device(device).type in ('cpu', 'cuda'))  # one kernel for all parameters
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, args.lr_decay) if args.lr_decay else None
    gen = torch.Generator().manual_seed(seed)
    train = data['train']
    y_all = train.labels.to(device)
    best, history = None, []
    for epoch in range(args.epochs):
        head.train()
        perm = torch.randperm(len(train.labels), generator=gen)
        total = 0.
        for i in range(0, len(perm), args.batch_size):
            videos = perm[i:i + args.batch_size]
            loss = loss_fn(head_outputs(head, train, videos, featurizer, device), y_all[videos.to(device)], task)
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item() * len(videos)
        lr = opt.param_groups[0]['lr']
        if sched is not None:
            sched.step()
        stats = {'task': task.name, 'seed': seed, 'epoch': epoch, 'lr': lr, 'train_loss': total / len(perm)}
        for split in ('val', 'test'):
            metric, loss = evaluate(head, data[split], task, featurizer, args.batch_size * 4, device)
            stats.update({f'{split}_{task.metric}': metric, f'{split}_loss': loss})
        history.append(stats)
        val, best_val = stats[f'val_{task.metric}'], best and best[f'val_{task.metric}']
        if best is None or (val < best_val if task.regression else val > best_val):   # first best epoch on ties
            best = stats
        if log_file is not None:
            log_file.write(json.dumps(stats) + '\n')
            log_file.flush()
        if log_writer is not None:
            for k, v in stats.items():
                if k not in ('task', 'seed', 'epoch'):
                    log_writer.add_scalar(k, v, epoch)
    return {'seed': seed, 'best_epoch': best['epoch'], 'val': best[f'val_{task.metric}'],
            'test': best[f'test_{task.metric}'], 'epochs': history}


def run_task(args, name, encoder, in_group=False, log_file=None):
    """One task over all seeds: the ``results.json`` entry (``{'skipped': reason}`` when its test
    split has no embeddings in a group run) and whether the embeddings came from a random encoder."""
    task = get_task(name, args.data_path)
    folder = os.path.join(args.data_path, name)
    test_csv = os.path.join(folder, 'test.csv')
    if not has_embeddings(test_csv):
        reason = f'no test embeddings ({test_csv} missing or none of its embedding files exists)'
        if in_group:
            print(f'[{name}] skipped: {reason}')
            return {'skipped': reason}, False
        raise EmbeddingError(f'task {name}: {reason}')
    featurizer = Featurizer(encoder, pooled=args.probe == 'lp')
    data, counts, random_init = {}, {}, False
    for split in SPLITS:
        seqs, labels, rnd = load_split(os.path.join(folder, f'{split}.csv'), task, args.input_size)
        args.input_size = args.input_size or seqs[0].shape[1]
        dim = encoder.embed_dim if encoder is not None else args.input_size
        random_init |= rnd
        longer = sum(s.shape[0] > args.num_patches for s in seqs)
        if longer:
            print(f'[{name}] {split}: {longer} videos longer than {args.num_patches} segments: ' +
                  ('outputs averaged over windows' if args.long_video else f'first {args.num_patches} used'))
        items = Items.from_videos(seqs, labels, args.num_patches, args.long_video)
        counts[split] = len(seqs)
        if not args.no_cache:
            t0 = time.time()
            mmap = None
            rows = sum(featurizer.out_length(int(n)) for n in items.length)
            if rows * dim * 4 > args.cache_ram_gb * 2 ** 30:
                os.makedirs(os.path.join(args.output_dir, 'feature_cache'), exist_ok=True)
                mmap = os.path.join(args.output_dir, 'feature_cache', f'{name}_{split}.npy')
            items = items.featurize(featurizer, args.feature_batch_size, args.device, mmap)
            print(f'[{name}] {split}: {len(seqs)} videos cached in {time.time() - t0:.1f}s' +
                  (f' ({mmap})' if mmap else ''))
        data[split] = items
    log_dir = args.log_dir or os.path.join(args.output_dir, 'tensorboard')
    runs = []
    for seed in args.seeds:
        writer = SummaryWriter(os.path.join(log_dir, name, f'seed{seed}'))
        r = train_seed(args, task, data, dim, featurizer if args.no_cache else None, seed, writer, log_file)
        writer.close()
        print(f'[{name}] seed {seed}: best val {task.metric} {r["val"]:.4f} at epoch {r["best_epoch"]}, '
              f'test {r["test"]:.4f}')
        runs.append({k: r[k] for k in ('seed', 'best_epoch', 'val', 'test')})
    shutil.rmtree(os.path.join(args.output_dir, 'feature_cache'), ignore_errors=True)
    tests, vals = np.array([r['test'] for r in runs]), np.array([r['val'] for r in runs])
    return {'metric': task.metric, 'test_mean': float(tests.mean()), 'test_std': float(tests.std()),
            'val_mean': float(vals.mean()), 'per_seed': runs, 'num_videos': counts,
            'num_classes': task.num_classes}, random_init


# ---------------------------------------------------------------------------------------- results
def classification_avg(tasks):
    accs = [r['test_mean'] for r in tasks.values() if r.get('metric') == 'top1']
    return float(np.mean(accs)) if accs else None


def results_markdown(summary, regression):
    """One-row table in the paper's column order; ``regression``: task name -> bool. 'Avg' (mean
    top-1 of the classification columns) follows the LVU classification columns when those are the
    only classification tasks, else it comes last."""
    order = list(COLUMN_NAMES)
    names = sorted(summary['tasks'], key=lambda n: order.index(n) if n in order else len(order))
    cls = [n for n in names if not regression[n]]
    cols = list(names)
    if cls:
        cols.insert(names.index(cls[-1]) + 1 if all(n in LVU_CLASSIFICATION for n in cls) else len(names), None)

    def cell(n):
        if n is None:
            return f'{summary["classification_avg"]:.2f}' if summary['classification_avg'] is not None else '-'
        r = summary['tasks'][n]
        if 'skipped' in r:
            return 'skipped*'
        digits = 3 if r['metric'] == 'mse' else 2
        return f'{r["test_mean"]:.{digits}f} ± {r["test_std"]:.{digits}f}'

    probe = summary['probe'].upper()
    method = f'raw embeddings + {probe}' if summary['baseline'] == 'raw' else \
        f'LV-MAE ({os.path.basename(summary["checkpoint"])}) + {probe}'
    if summary['random_encoder']:
        method += ' [RANDOM LanguageBind embeddings: pipeline test only]'
    header = ['Method'] + [COLUMN_NAMES.get(n, n) if n else 'Avg' for n in cols]
    lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header),
             '| ' + ' | '.join([method] + [cell(n) for n in cols]) + ' |', '']
    seeds = {len(r['per_seed']) for r in summary['tasks'].values() if 'per_seed' in r}
    reg = [n for n in names if regression[n]]
    lines.append(f'Test score at the epoch with the best val score; mean ± std over {max(seeds, default=0)} seed(s). '
                 'Top-1 % for classification' + (f', MSE (lower is better) for {", ".join(reg)}.' if reg else '.'))
    if cls:
        lines.append(f'Avg: mean top-1 over {", ".join(n for n in cls if "skipped" not in summary["tasks"][n])}.')
    lines += [f'*{n}: skipped, {r["skipped"]}.' for n, r in summary['tasks'].items() if 'skipped' in r]
    return '\n'.join(lines) + '\n'


def write_results(output_dir, summary, regression):
    md = results_markdown(summary, regression)
    atomic_write_text(os.path.join(output_dir, 'results.json'), json.dumps(summary, indent=1))
    atomic_write_text(os.path.join(output_dir, 'results.md'), md)
    return md


def main(args):
    names = expand_tasks(args.task)
    in_group = len(names) > 1
    if args.baseline is None and not args.resume:
        raise SystemExit('give --resume <LV-MAE checkpoint>, or --baseline raw to probe the raw embeddings')
    if args.baseline is not None and args.resume:
        raise SystemExit('--baseline raw uses no encoder: leave out --resume')
    encoder = load_encoder(args).to(args.device) if args.resume else None
    args.num_patches = args.num_patches or 256
    os.makedirs(args.output_dir, exist_ok=True)
    summary = {'probe': args.probe, 'baseline': args.baseline, 'checkpoint': args.resume or None,
               'random_encoder': False, 'tasks': {}, 'classification_avg': None}
    regression = {}
    with open(os.path.join(args.output_dir, 'log.txt'), 'a') as log_file:
        for name in names:
            regression[name] = get_task(name, args.data_path).regression
            summary['tasks'][name], random_init = run_task(args, name, encoder, in_group, log_file)
            summary['random_encoder'] |= random_init
            summary['classification_avg'] = classification_avg(summary['tasks'])
            md = write_results(args.output_dir, summary, regression)
    print(md)
    return summary
