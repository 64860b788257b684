"""Pretraining speed and memory: our training step against the original LV-MAE release's.

    python bench/bench_pretrain.py --preset lvu       # batch 8 of 12-36 segments: ours, ours_pad256, original
    python bench/bench_pretrain.py --preset full256   # 256-segment windows: ours, original
    python bench/bench_pretrain.py --preset memory    # forward+backward peak memory at 256/1024/4096 tokens
    python bench/bench_pretrain.py --preset gpu       # the paper's configuration (depth 32, bf16, batch 16)
    python bench/bench_pretrain.py --preset loader    # data loading: samples/s of one loader process

The loader preset writes store files of the paper's size (1,024-d float16, videos of 100-800 segments)
to a temporary folder and times one process (one thread, as a DataLoader worker) building batches of
training samples (windows of up to 256 segments); one line per way of reading:
  store/window      this repository: only the window's rows are read, straight into the batch
  store/whole_file  the whole video's file read and normalised, then cut, each sample then copied into
                    the padded batch (this repository before)
  original_layout   the original release's layout, one .pt file per segment (only the window's files)
The files were just written, so they sit in the page cache: this measures the loader's own work, not
the disk.

One JSON line per measurement; each runs in a fresh process so that its peak memory is its own.
``cpu_ms_per_step`` (process CPU time) is steadier than wall time on a shared machine with --threads 1.
A step is forward + backward + AdamW step (fused, the same in every mode). Modes, all on the same
model weights and the same batches:
  ours         LVMAE as used by main_pretrain.py: padded to the longest video of the batch, masks drawn
               inside the step, the encoder sees only the visible tokens.
  ours_pad256  the same batches padded to --num_patches (shows what padding to the longest saves).
  original     the original release's computation (``original_forward``): every video padded to
               num_patches, the visible tokens (padded back to num_patches) fed to the encoder with the
               padding excluded only by the attention mask, and the decoder's sequence restored video
               by video in Python. Its per-video masking is done before the step, as its data loader did.
All modes draw the same masks (the same noise; semantic masking is deterministic), so their first-step
losses must agree: ``loss_diff`` reports the difference from ours. Attention in the original mode is
computed explicitly (``q @ k^T``, masked_fill, softmax, ``@ v``) as the release's own Attention module did,
with the same weights.
"""
import argparse
import json
import os
import resource
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from engine_pretrain import param_groups  # noqa: E402
from models_lvmae import LVMAE  # noqa: E402
from util.datasets import PretrainDataset, tile_short  # noqa: E402
from util.embeddings import embedding_path, load_row, save_video_embeddings  # noqa: E402

MODES = ('ours', 'ours_pad256', 'original')
PRESETS = {
    'lvu': dict(batch_size=8, lengths='12-36', modes='ours,ours_pad256,original'),
    'full256': dict(batch_size=4, lengths='256', modes='ours,original', steps=3),
    'memory': dict(batch_size=1, lengths='256,1024,4096', num_patches=4096, modes='memory'),
    'gpu': dict(device='cuda', dtype='bfloat16', depth=32, batch_size=16, lengths='12-36,256',
                modes='ours,ours_pad256,original', steps=20, warmup=5),
    'loader': dict(modes='loader', lengths='100-800', batch_size=16),
}
LOADER_READS = ('store/window', 'store/whole_file', 'original_layout')


def get_args_parser():
    p = argparse.ArgumentParser('LV-MAE pretraining benchmark')
    p.add_argument('--preset', choices=sorted(PRESETS), default=None,
                   help='named setting; flags given explicitly override it')
    p.add_argument('--modes', default='ours,original',
                   help=f'comma list of {MODES}, or "memory" (forward+backward peak memory per length)')
    p.add_argument('--lengths', default='12-36',
                   help='comma list of length distributions: "A-B" uniform in [A, B] per video, or "N" fixed')
    p.add_argument('--batch_size', default=8, type=int)
    p.add_argument('--num_patches', default=256, type=int, help='longest sequence; what ours_pad256/original pad to')
    p.add_argument('--input_size', default=1024, type=int)
    p.add_argument('--depth', default=4, type=int, help='encoder depth (the paper: 32)')
    p.add_argument('--num_heads', default=16, type=int)
    p.add_argument('--decoder_embed_dim', default=512, type=int)
    p.add_argument('--decoder_depth', default=8, type=int)
    p.add_argument('--decoder_num_heads', default=16, type=int)
    p.add_argument('--mask_ratio', default=0.5, type=float)
    p.add_argument('--semantic', action='store_true', help='semantic masking (keep the change points)')
    p.add_argument('--steps', default=5, type=int, help='timed steps per measurement')
    p.add_argument('--warmup', default=1, type=int, help='untimed steps before them')
    p.add_argument('--quick', action='store_true', help='2 timed steps, 1 warm-up')
    p.add_argument('--device', default='cpu')
    p.add_argument('--dtype', default='float32', choices=['float32', 'bfloat16'], help='bfloat16 = autocast')
    p.add_argument('--threads', default=None, type=int, help='torch CPU threads (default: torch\'s choice)')
    p.add_argument('--seed', default=0, type=int)
    p.add_argument('--pad_multiple', default=0, type=int,
                   help='ours: pad batches and visible tokens to a multiple (0: 32 on GPU, 1 on CPU, as main_pretrain.py)')
    p.add_argument('--cudnn_sdp', action='store_true', help='let attention use cuDNN on GPU (main_pretrain.py: off)')
    p.add_argument('--loader_videos', default=64, type=int, help='loader: store files written (videos)')
    p.add_argument('--loader_samples', default=3000, type=int, help='loader: samples timed per line')
    p.add_argument('--loader_reads', default=','.join(LOADER_READS), help=f'loader: comma list of {LOADER_READS}')
    return p


def parse_args(argv=None):
    parser = get_args_parser()
    preset = parser.parse_args(argv).preset
    if preset:
        parser.set_defaults(**PRESETS[preset])
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.warmup = 2, 1
        args.loader_videos, args.loader_samples = min(args.loader_videos, 8), min(args.loader_samples, 64)
    if args.pad_multiple < 0:
        parser.error('--pad_multiple must not be negative')
    if not args.pad_multiple:
        args.pad_multiple = 32 if args.device.startswith('cuda') else 1
    if args.steps < 1:
        parser.error('--steps must be at least 1')
    return args


def parse_lengths(spec):
    lo, _, hi = spec.partition('-')
    return int(lo), int(hi or lo)


def build_model(args):
    """The seeded model of one measurement (and its thread count)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    if args.device.startswith('cuda') and not args.cudnn_sdp:
        torch.backends.cuda.enable_cudnn_sdp(False)
    model = LVMAE(num_patches=args.num_patches, input_size=args.input_size, depth=args.depth,
                  num_heads=args.num_heads, decoder_embed_dim=args.decoder_embed_dim,
                  decoder_depth=args.decoder_depth, decoder_num_heads=args.decoder_num_heads).to(args.device)
    model.pad_multiple = args.pad_multiple
    return model


def make_batch(args, spec, seed):
    """Seeded ``x [B, num_patches, D]`` (unit rows, zeros past each length), ``lengths [B]`` drawn
    from ``spec`` and ``noise [B, num_patches]``."""
    g = torch.Generator().manual_seed(seed)
    lo, hi = parse_lengths(spec)
    lengths = torch.randint(lo, hi + 1, (args.batch_size,), generator=g)
    x = F.normalize(torch.randn(args.batch_size, args.num_patches, args.input_size, generator=g), dim=-1)
    x = x * LVMAE.valid_mask(lengths, args.num_patches)[..., None]
    noise = torch.rand(args.batch_size, args.num_patches, generator=g)
    return x, lengths, noise


# ---------------------------------------------------------------------- the original release's step
def original_inputs(x, lengths, noise, mask_ratio, semantic=False):
    """What the original release's dataset produced for each video, stacked: the visible tokens in
    shuffled order padded to the full length ``x.shape[1]``, their count, ``ids_shuffle`` /
    ``ids_restore`` (zeros past the length) and the mask (1 = masked)."""
    B, N, D = x.shape
    vis, mask = torch.zeros_like(x), torch.zeros(B, N, device=x.device)
    ids_shuffle = torch.zeros(B, N, dtype=torch.long, device=x.device)
    ids_restore, n_vis = torch.zeros_like(ids_shuffle), torch.zeros(B, dtype=torch.long)
    for i in range(B):
        L = int(lengths[i])
        xi = x[i, :L]
        score = LVMAE.segment_similarity(xi[None])[0] if semantic else noise[i, :L]
        shuffle = torch.argsort(score)               # ascending: the first ones are kept
        restore = torch.argsort(shuffle)
        k = int(L * (1 - mask_ratio))
        vis[i, :k] = xi[shuffle[:k]]
        m = torch.ones(L, device=x.device)
        m[:k] = 0
        mask[i, :L] = m[restore]
        ids_shuffle[i, :L], ids_restore[i, :L], n_vis[i] = shuffle, restore, k
    return dict(vis=vis, n_vis=n_vis, ids_shuffle=ids_shuffle, ids_restore=ids_restore,
                mask=mask, target=x, lengths=lengths.cpu())


def original_block(blk, x, attend):
    """One of ``model``'s timm blocks computed as the original release's Block: attention written out
    (scores materialised, padding filled with -inf), same weights. ``attend [B, N]``: True = real key."""
    a = blk.attn
    B, N, C = x.shape
    q, k, v = a.qkv(blk.norm1(x)).reshape(B, N, 3, a.num_heads, C // a.num_heads).permute(2, 0, 3, 1, 4)
    scores = (q @ k.transpose(-2, -1)) * a.scale
    scores = scores.masked_fill(~attend[:, None, None, :], float('-inf')).softmax(dim=-1)
    x = x + a.proj((scores @ v).transpose(1, 2).reshape(B, N, C))
    return x + blk.mlp(blk.norm2(x))


def original_forward(model, inp):
    """``loss, pred, mask`` computed the way the original release's model did, with ``model``'s weights."""
    vis, n_vis, lengths = inp['vis'], inp['n_vis'], inp['lengths']
    B, N, _ = vis.shape
    slots = torch.arange(N + 1, device=vis.device)[None, :]
    # encoder: the padded visible set; each video's position rows gathered by its own ids_shuffle
    x = model.input_proj(vis)
    pos = []
    for i in range(B):
        L = int(lengths[i])
        p = model.pos_embed[0, 1:L + 1][inp['ids_shuffle'][i, :L]]
        pos.append(torch.cat([p, p.new_zeros(N - L, p.shape[1])]))
    x = x + torch.stack(pos)
    x = torch.cat([(model.cls_token + model.pos_embed[:, :1]).expand(B, -1, -1), x], dim=1)
    attend = slots <= n_vis.to(vis.device)[:, None]   # CLS + visible tokens
    for blk in model.blocks:
        x = original_block(blk, x, attend)
    y = model.decoder_embed(model.norm(x))
    # decoder: restore each video's sequence in a Python loop, then pad it back to N + 1
    rows = []
    for i in range(B):
        L, k = int(lengths[i]), int(n_vis[i])
        full = torch.cat([y[i, 1:k + 1], model.mask_token[0].to(y.dtype).expand(L - k, -1)])
        full = torch.gather(full, 0, inp['ids_restore'][i, :L, None].expand(-1, full.shape[1]))
        row = torch.cat([y[i, :1], full]) + model.decoder_pos_embed[0, :L + 1]
        rows.append(torch.cat([row, row.new_zeros(N - L, row.shape[1])]))
    z = torch.stack(rows)
    attend = slots <= lengths.to(vis.device)[:, None]
    for blk in model.decoder_blocks:
        z = original_block(blk, z, attend)
    pred = model.decoder_pred(model.decoder_norm(z))[:, 1:]
    # the release's loss: MSE over the dimension, averaged over all masked tokens of the batch
    mask = inp['mask']
    per_token = ((pred.float() - inp['target'].float()) ** 2).mean(dim=-1)
    return (per_token * mask).sum() / mask.sum(), pred, mask


# ---------------------------------------------------------------------- arithmetic
def block_flops(n, d, mlp_ratio=4):
    """Forward FLOPs of one pre-norm block on ``n`` tokens of width ``d`` (matmuls only)."""
    return 2 * n * d * d * (4 + 2 * mlp_ratio) + 4 * n * n * d


def step_flops(args, enc_tokens, dec_tokens):
    """Training-step FLOPs (3x the forward) for one video with ``enc_tokens`` / ``dec_tokens`` tokens
    (CLS included) going through the encoder / decoder."""
    D, Dd = args.input_size, args.decoder_embed_dim
    fwd = (args.depth * block_flops(enc_tokens, D) + 2 * enc_tokens * D * Dd
           + args.decoder_depth * block_flops(dec_tokens, Dd) + 2 * (dec_tokens - 1) * Dd * D)
    return 3 * fwd


def batch_flops(args, mode, lengths):
    """What ``mode`` computes for one batch, padding included."""
    if mode == 'original':
        n_enc = n_dec = args.num_patches + 1
    else:
        m = args.pad_multiple
        L = args.num_patches if mode == 'ours_pad256' else min(-(-int(lengths.max()) // m) * m, args.num_patches)
        n_enc = 1 + min(-(-int(LVMAE.num_keep(lengths, args.mask_ratio).max()) // m) * m, L)
        n_dec = 1 + L
    return len(lengths) * step_flops(args, n_enc, n_dec)


# ---------------------------------------------------------------------- measurements
def autocast(args):
    return torch.autocast(torch.device(args.device).type, dtype=torch.bfloat16, enabled=args.dtype == 'bfloat16')


def current_mem_mb(args):
    """Memory in use now: CUDA allocated, or this process's resident set (Linux /proc)."""
    if args.device.startswith('cuda'):
        return torch.cuda.memory_allocated() / 2 ** 20
    with open('/proc/self/statm') as f:
        return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE') / 2 ** 20


def peak_mem_mb(args):
    """Peak since the process started (CPU) or since the last reset (CUDA)."""
    if args.device.startswith('cuda'):
        return torch.cuda.max_memory_allocated() / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 10   # KiB on Linux


def sync(args):
    if args.device.startswith('cuda'):
        torch.cuda.synchronize()


def step_fn(args, model, mode, batch):
    """A closure computing the loss of one batch in ``mode`` (inputs prepared as each code base does
    before its step)."""
    x, lengths, noise = (t.to(args.device) for t in batch)
    semantic = args.semantic
    if mode == 'original':
        inp = original_inputs(x, lengths, noise, args.mask_ratio, semantic)
        return lambda: original_forward(model, inp)[0]
    m = args.pad_multiple
    L = args.num_patches if mode == 'ours_pad256' else min(-(-int(lengths.max()) // m) * m, args.num_patches)
    x, noise = x[:, :L], noise[:, :L]
    return lambda: model(x, lengths, args.mask_ratio, semantic=semantic, noise=noise)[0]


def measure_speed(args, mode, spec):
    """Time ``args.steps`` training steps (after ``args.warmup``) of ``mode`` on ``spec`` lengths."""
    model = build_model(args).train()
    optimizer = torch.optim.AdamW(param_groups(model, 0.05), lr=1e-4, betas=(0.9, 0.95), fused=True)
    n = args.warmup + args.steps
    batches = [make_batch(args, spec, args.seed * 1000 + i) for i in range(n)]
    steps = [step_fn(args, model, mode, b) for b in batches]
    base = current_mem_mb(args)
    if args.device.startswith('cuda'):
        torch.cuda.reset_peak_memory_stats()
    losses = []
    for i, step in enumerate(steps):
        if i == args.warmup:
            sync(args)
            t0, c0 = time.perf_counter(), time.process_time()
        with autocast(args):
            loss = step()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    sync(args)
    dt = (time.perf_counter() - t0) / args.steps
    cpu = (time.process_time() - c0) / args.steps
    peak = peak_mem_mb(args)
    flops = sum(batch_flops(args, mode, b[1]) for b in batches[args.warmup:]) / args.steps
    return dict(mode=mode, lengths=spec, mean_length=float(torch.cat([b[1] for b in batches]).float().mean()),
                steps_per_s=1 / dt, samples_per_s=args.batch_size / dt, ms_per_step=1e3 * dt,
                cpu_ms_per_step=1e3 * cpu, gflop_per_step=flops / 1e9, achieved_gflops=flops / dt / 1e9,
                base_mem_mb=base, peak_mem_mb=peak, step_growth_mb=peak - base,
                loss_first=losses[0], loss_last=losses[-1])


def measure_memory(args, length):
    """Peak memory of one forward + backward of ours on ``batch_size`` videos of ``length`` tokens,
    above what the model and inputs already hold."""
    model = build_model(args).train()
    x, lengths, noise = (t.to(args.device) for t in make_batch(args, str(length), args.seed))
    with autocast(args):   # a short warm-up step: one-off allocations and the gradients are not counted
        model(x[:, :16], lengths.clamp(max=16), args.mask_ratio, noise=noise[:, :16])[0].backward()
    model.zero_grad(set_to_none=False)
    sync(args)
    base = current_mem_mb(args)
    if args.device.startswith('cuda'):
        torch.cuda.reset_peak_memory_stats()
    x, noise = x[:, :length], noise[:, :length]
    with autocast(args):
        loss = model(x, lengths, args.mask_ratio, semantic=args.semantic, noise=noise)[0]
    loss.backward()
    sync(args)
    grow = peak_mem_mb(args) - base
    return dict(mode='memory', tokens=length, batch_size=args.batch_size, base_mem_mb=base,
                peak_growth_mb=grow, bytes_per_token=grow * 2 ** 20 / (length * args.batch_size))


class WholeFileDataset(PretrainDataset):
    """The loader as it was: read and normalise the whole video's file, then cut the window, sample by
    sample; a batch is the samples copied into the batch padded to the longest, rounded up to
    ``pad_multiple`` but not past ``num_patches`` (the same samples and batches as ``PretrainDataset``;
    tests/test_pretrain.py checks that byte for byte)."""

    def __getitems__(self, indices):
        samples = [self[i] for i in indices]
        lengths = torch.tensor([x.shape[0] for x, _ in samples])
        longest, m = int(lengths.max()), self.pad_multiple
        L = max(min(-(-longest // m) * m, self.num_patches), longest)
        x = torch.empty(len(samples), L, samples[0][0].shape[1])
        noise = torch.ones(len(samples), L)
        for i, (xi, nz) in enumerate(samples):
            x[i, :xi.shape[0]] = xi
            x[i, xi.shape[0]:] = 0
            noise[i, :nz.shape[0]] = nz
        return x, lengths, noise

    def __getitem__(self, index):
        rng = np.random.default_rng([self.seed, self.epoch, index] if self.train else [self.seed, index])
        for _ in range(100):
            csv, row = self.rows[index]
            emb = load_row(row, self.input_size, csv)
            if int(emb.shape[0] * (1 - self.mask_ratio)) >= 1:
                start, stop = self._window(emb.shape[0], rng)
                x = tile_short(emb[start:stop], emb.shape[0])[:self.num_patches]
                return x, torch.from_numpy(rng.random(x.shape[0])).float()
            index = int(rng.integers(len(self.rows)))


def write_loader_data(folder, args, layout, n_videos):
    """``n_videos`` videos with lengths drawn from ``args.lengths``, as store files or in the original
    release's layout (``<root>/<video>/<start>-<end>/langbind_output.pt``); returns the CSV's path."""
    rng = np.random.default_rng(args.seed)
    lo, hi = parse_lengths(args.lengths)
    rows = []
    for i in range(n_videos):
        n = int(rng.integers(lo, hi + 1))
        emb = rng.standard_normal((n, args.input_size), dtype=np.float32)
        vid = f'video{i}'
        if layout == 'store':
            path = embedding_path(os.path.join(folder, 'store'), vid)
            save_video_embeddings(path, emb, np.arange(n) * 5.0, np.arange(1, n + 1) * 5.0)
            rows.append({'video_id': vid, 'embedding_path': path, 'number_of_segments': n})
        else:
            emb = torch.from_numpy(emb).half()
            paths = []
            for k in range(n):
                seg = os.path.join(folder, 'legacy', vid, f'{5 * k}-{5 * k + 5}', 'langbind_output.pt')
                os.makedirs(os.path.dirname(seg))
                torch.save({'embedding': emb[k].clone(), 'start': 5 * k, 'end': 5 * k + 5}, seg)
                paths.append(seg)
            rows.append({'video_id': vid, 'segment_paths': repr(paths), 'number_of_segments': n})
    csv = os.path.join(folder, f'{layout}.csv')
    pd.DataFrame(rows).to_csv(csv, index=False)
    return csv


def measure_loader(args, read):
    """Samples per second of one process (one thread) producing training batches, as a DataLoader
    worker does (``__getitems__``)."""
    torch.set_num_threads(1)
    layout = 'legacy' if read == 'original_layout' else 'store'
    n_videos = args.loader_videos if layout == 'store' else max(2, args.loader_videos // 8)
    n_samples = args.loader_samples if layout == 'store' else max(args.batch_size, args.loader_samples // 4)
    with tempfile.TemporaryDirectory() as folder:
        csv = write_loader_data(folder, args, layout, n_videos)
        cls = WholeFileDataset if read == 'store/whole_file' else PretrainDataset
        ds = cls(csv, args.input_size, args.num_patches, args.mask_ratio, seed=args.seed)
        order = np.random.default_rng(args.seed).permutation(n_samples) % len(ds)
        ds.__getitems__(order[:args.batch_size].tolist())   # warm-up
        tokens = 0
        t0, c0 = time.perf_counter(), time.process_time()
        for b in range(0, n_samples, args.batch_size):
            x, lengths, _ = ds.__getitems__(order[b:b + args.batch_size].tolist())
            tokens += int(lengths.sum())
        dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    return dict(measure='loader', read=read, samples_per_s=n_samples / dt, cpu_samples_per_s=n_samples / cpu,
                ms_per_sample=1e3 * dt / n_samples, mean_window=tokens / n_samples, samples=n_samples,
                videos=n_videos, lengths=args.lengths, input_size=args.input_size, num_patches=args.num_patches,
                batch_size=args.batch_size, goal='samples_per_s >= 2000 (one H100 at the paper\'s configuration)')


def in_fresh_process(fn, *a):
    with ProcessPoolExecutor(1, mp_context=get_context('spawn')) as ex:
        return ex.submit(fn, *a).result()


def main(args):
    config = {k: v for k, v in vars(args).items() if k not in ('modes', 'lengths', 'quick')}
    config['threads'] = args.threads or torch.get_num_threads()
    modes = args.modes.split(',')
    if modes == ['loader']:
        for read in args.loader_reads.split(','):
            if read not in LOADER_READS:
                raise SystemExit(f'unknown --loader_reads entry {read!r}; choose from {LOADER_READS}')
            print(json.dumps(in_fresh_process(measure_loader, args, read)), flush=True)
        return
    if modes == ['memory']:
        prev = None
        for length in map(int, args.lengths.split(',')):
            r = in_fresh_process(measure_memory, args, length)
            if prev:   # constant when memory grows linearly with the length
                r['marginal_bytes_per_token'] = ((r['peak_growth_mb'] - prev['peak_growth_mb']) * 2 ** 20
                                                 / ((length - prev['tokens']) * args.batch_size))
            print(json.dumps({**r, 'config': config}), flush=True)
            prev = r
        return
    for m in modes:
        if m not in MODES:
            raise SystemExit(f'unknown mode {m!r}; choose from {MODES} or "memory"')
    for spec in args.lengths.split(','):
        results = {m: in_fresh_process(measure_speed, args, m, spec) for m in modes}
        ours = results.get('ours')
        for m, r in results.items():
            if ours is not None and m != 'ours':
                speedup = r['ms_per_step'] / ours['ms_per_step']
                arith = r['gflop_per_step'] / ours['gflop_per_step']
                r.update(ours_speedup=speedup, ours_cpu_speedup=r['cpu_ms_per_step'] / ours['cpu_ms_per_step'],
                         arith_ratio=arith, bound_fraction=speedup / arith,
                         loss_diff=abs(r['loss_first'] - ours['loss_first']))
            print(json.dumps({**r, 'config': config}), flush=True)


if __name__ == '__main__':
    main(parse_args())
