"""Time an attentive-probe run with the feature cache versus recomputing the frozen encoder every
epoch, and a learning-rate x weight-decay sweep (3 x 2 heads trained together) versus a single head on
the same cached features.

LVU-sized synthetic task (random unit-norm segment embeddings, 12 to 36 segments per video, random
labels: the timing does not depend on them), randomly initialised LV-MAE encoder of the paper's
width. Prints one JSON line per measurement: the cached run (cache build + training), the uncached
run, and the speed-up. On a CPU, reduce ``--depth`` and measure the uncached run over a few epochs
(``--uncached_epochs``): its time per epoch is constant, and the 30-epoch figure is then extrapolated
(said so in the JSON line).

    python bench/bench_probe.py                                  # paper width and depth, 30 epochs
    python bench/bench_probe.py --depth 4 --uncached_epochs 3   # CPU
    python bench/bench_probe.py --quick                          # seconds: smoke run of the script
    python bench/bench_probe.py --mode sweep --depth 4           # sweep only (the encoder pass is shared)
"""
import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import engine_probe as ep  # noqa: E402
import main_probe as mp  # noqa: E402
from models_lvmae import LVMAE  # noqa: E402
from util.features import Featurizer, Items  # noqa: E402
from util.misc import keep_freed_memory  # noqa: E402
from util.tasks import Task  # noqa: E402


def synthetic_split(n, args, gen):
    lengths = torch.randint(args.min_len, args.max_len + 1, (n,), generator=gen)
    seqs = [torch.nn.functional.normalize(torch.randn(int(L), args.input_size, generator=gen), dim=-1) for L in lengths]
    return Items.from_videos(seqs, torch.randint(0, 6, (n,), generator=gen), 256, long_video=False)


def main():
    p = argparse.ArgumentParser('probe benchmark: cached vs uncached encoder')
    p.add_argument('--num_videos', default=3000, type=int, help='train videos (val and test: a tenth each)')
    p.add_argument('--min_len', default=12, type=int)
    p.add_argument('--max_len', default=36, type=int)
    p.add_argument('--input_size', default=1024, type=int, help='encoder width (paper: 1024)')
    p.add_argument('--depth', default=32, type=int, help='encoder depth (paper: 32; reduce on a CPU)')
    p.add_argument('--num_heads', default=16, type=int)
    p.add_argument('--epochs', default=30, type=int)
    p.add_argument('--uncached_epochs', default=None, type=int,
                   help='epochs actually run uncached (default --epochs); the rest is extrapolated')
    p.add_argument('--batch_size', default=16, type=int)
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    p.add_argument('--probe', default='ap', choices=['ap', 'lp'])
    p.add_argument('--mode', default='all', choices=['all', 'cache', 'sweep'],
                   help='cache: cached vs uncached; sweep: a 3 x 2 (lr, weight decay) grid vs one head; all: both')
    p.add_argument('--quick', action='store_true', help='200 videos, depth 1, 3 epochs (uncached: 1)')
    args = p.parse_args()
    if args.quick:
        args.num_videos, args.depth, args.epochs, args.uncached_epochs = 200, 1, 3, 1
    n_unc = min(args.uncached_epochs or args.epochs, args.epochs)
    if args.device == 'cpu':
        keep_freed_memory()   # as main_probe.py does

    gen = torch.Generator().manual_seed(0)
    raw = {s: synthetic_split(n, args, gen) for s, n in
           (('train', args.num_videos), ('val', args.num_videos // 10), ('test', args.num_videos // 10))}
    torch.manual_seed(0)
    encoder = LVMAE(num_patches=256, input_size=args.input_size, depth=args.depth, num_heads=args.num_heads,
                    decoder_depth=0).to(args.device).eval().requires_grad_(False)
    featurizer = Featurizer(encoder, pooled=args.probe == 'lp')
    task = Task('bench', 6)
    run_args = mp.get_args_parser(args.probe).parse_args(
        ['--device', args.device, '--batch_size', str(args.batch_size), '--epochs', str(args.epochs)])
    common = {'bench': f'probe_{args.probe}', 'device': args.device, 'threads': torch.get_num_threads(),
              'train_videos': args.num_videos, 'segments': [args.min_len, args.max_len],
              'width': args.input_size, 'depth': args.depth, 'batch_size': args.batch_size, 'epochs': args.epochs}

    def sync():
        if args.device.startswith('cuda'):
            torch.cuda.synchronize()

    def timed(fn):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        return time.perf_counter() - t0

    cached = {}
    cache_s = timed(lambda: cached.update({s: items.featurize(featurizer, 64, args.device) for s, items in raw.items()}))
    single = [(3e-4, 1e-3)]
    train_s = timed(lambda: ep.train_seed(run_args, task, cached, encoder.embed_dim, None, 0, single))
    if args.mode in ('all', 'cache'):
        print(json.dumps({**common, 'mode': 'cached', 'cache_s': round(cache_s, 3), 'train_s': round(train_s, 3),
                          'total_s': round(cache_s + train_s, 3)}), flush=True)
        run_args.epochs = n_unc
        measured = timed(lambda: ep.train_seed(run_args, task, raw, encoder.embed_dim, featurizer, 0, single))
        run_args.epochs = args.epochs
        uncached_s = measured * args.epochs / n_unc
        print(json.dumps({**common, 'mode': 'uncached', 'epochs_run': n_unc, 'measured_s': round(measured, 3),
                          'total_s': round(uncached_s, 3), 'extrapolated': n_unc < args.epochs}), flush=True)
        print(json.dumps({**common, 'mode': 'speedup', 'speedup': round(uncached_s / (cache_s + train_s), 2),
                          'extrapolated': n_unc < args.epochs}), flush=True)
    if args.mode in ('all', 'sweep'):
        grid = [(lr, wd) for lr in (1e-4, 3e-4, 1e-3) for wd in (1e-3, 1e-2)]
        grid_s = timed(lambda: ep.train_seed(run_args, task, cached, encoder.embed_dim, None, 0, grid))
        # the single head again, warm (the first run also loads kernels and fills allocators): the faster
        # of the two is the reference, which can only raise the ratio
        train_s = min(train_s, timed(lambda: ep.train_seed(run_args, task, cached, encoder.embed_dim, None, 0, single)))
        print(json.dumps({**common, 'mode': 'sweep', 'heads': len(grid), 'single_train_s': round(train_s, 3),
                          'grid_train_s': round(grid_s, 3), 'train_ratio': round(grid_s / train_s, 2),
                          'cache_s': round(cache_s, 3),
                          'run_ratio': round((cache_s + grid_s) / (cache_s + train_s), 2)}), flush=True)

if __name__ == '__main__':
    main()
