"""Attentive (AP) and linear (LP) probing of a frozen LV-MAE encoder: flags, tasks, seeds, the
encoder and its feature cache, results (docs/EVAL.md). The user-facing scripts are
``test_ap_movie_clip.py`` and ``test_lp_movie_clip.py``; the loops are in ``engine_probe.py``.

For each task (``<data_path>/<task>/{train,val,test}.csv``; head size from util.tasks, never from
the labels of a split) and each seed, heads train on the encoder's cached outputs and the test score
at the epoch with the best val score is reported. ``--lr`` / ``--weight_decay`` with several values
train every combination together and report the one with the best mean val score.
"""
import argparse
import hashlib
import os
import shutil
import time
import uuid

import numpy as np
import torch
from torch.utils.tensorboard import SummaryWriter

from engine_probe import schedule, train_seed
from models_lvmae import LVMAE, PAPER_CONFIG
from util.checkpoint import (DECODER_PREFIXES, ArchitectureError, checkpoint_args, load_checkpoint,
                             load_model_state, model_state, resolve_arch)
from util.embeddings import EmbeddingError
from util.errors import InputError
from util.features import FEATURE_DTYPES, Featurizer, Items, NonFiniteError, has_embeddings, load_split
from util.fileio import FolderLock
from util.misc import default_device, keep_freed_memory
from util.results import classification_avg, write_results
from util.tasks import GROUPS, SPLITS, expand_tasks, get_task

ARCH_FLAGS = ('input_size', 'num_patches', 'depth', 'num_heads', 'mlp_ratio', 'embed_dim')
SELECTION = 'test score at the epoch with the best val score; ties: the later epoch (>=, as released)'
GRID_SELECTION = 'the (lr, weight_decay) with the best mean val score over seeds; ties: the first in grid order'


def get_args_parser(probe):
    name = {'ap': 'attentive', 'lp': 'linear'}[probe]
    p = argparse.ArgumentParser(f'LV-MAE {name} probing', add_help=True)
    p.add_argument('--task', default=['scene'], nargs='+',
                   help=f'task(s): {", ".join(GROUPS["all"])}, a folder with a task.json under --data_path, '
                        'or a group: lvu (the 9 LVU tasks), all (LVU + breakfast + coin)')
    p.add_argument('--data_path', default='data', help='CSV root of step 4: <data_path>/<task>/{train,val,test}.csv')
    p.add_argument('--resume', default='', help='LV-MAE checkpoint (ours or the original release\'s)')
    p.add_argument('--trust_checkpoint', action='store_true',
                   help='allow a checkpoint holding Python objects other than tensors and plain args to be '
                        'fully unpickled (this can run code from the file: only for files you trust)')
    p.add_argument('--baseline', default=None, choices=['raw', 'random_init'],
                   help='raw: no encoder, the head on the raw segment embeddings ("LanguageBind + %s"); '
                        'random_init: an encoder of the architecture of --resume (or of the flags) with random '
                        'weights from each seed, no pretraining (what the architecture alone gives)' % probe.upper())
    # optimisation: the original release's recipe (docs/EVAL.md gives the paper's as flag sets)
    p.add_argument('--batch_size', default=16, type=int)
    p.add_argument('--epochs', default=30, type=int)
    p.add_argument('--lr', default=[3e-4], type=float, nargs='+',
                   help='Adam learning rate; several values: a sweep (with --weight_decay), selected on val')
    p.add_argument('--weight_decay', default=[1e-3], type=float, nargs='+',
                   help='Adam weight decay (L2, as released: 1e-3); several values: a sweep')
    p.add_argument('--no_amsgrad', action='store_true', help='plain Adam (released: amsgrad)')
    p.add_argument('--sched', default=None, choices=['cosine', 'none', 'exp'],
                   help='per-epoch schedule: cosine annealing over --epochs (released; the default), none, or '
                        'exp (ExponentialLR by --lr_decay; the default when only --lr_decay is given)')
    p.add_argument('--lr_decay', default=None, type=float, help='ExponentialLR factor per epoch (paper AP: 0.9)')
    p.add_argument('--keep_last_batch', action='store_true',
                   help='train also on the last partial batch of an epoch (released: dropped)')
    p.add_argument('--seeds', default=[0], type=int, nargs='+',
                   help='run each task once per seed (head init and data order); mean and std reported')
    # architecture: default to the checkpoint's (its args, else its parameter shapes), else the paper's
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
    p.add_argument('--feature_dtype', default='fp32', choices=list(FEATURE_DTYPES),
                   help='precision of the frozen encoder pass (fp32 as released; bf16: autocast, faster on GPU)')
    p.add_argument('--no_cache', action='store_true', help='recompute the encoder every epoch (benchmark, tests)')
    p.add_argument('--cache_ram_gb', default=8.0, type=float,
                   help='feature caches larger than this go to a memory-mapped file under --output_dir')
    p.add_argument('--feature_batch_size', default=64, type=int, help='videos per encoder batch when caching')
    p.add_argument('--output_dir', default=f'./output_dir/probe_{probe}', help='log.txt, results.json, results.md')
    p.add_argument('--log_dir', default=None, help='TensorBoard folder (default: <output_dir>/tensorboard)')
    p.add_argument('--device', default='auto',
                   help='auto (cuda:$LOCAL_RANK under torchrun, else cuda when available, else cpu), cpu, cuda or cuda:N')
    p.set_defaults(probe=probe)
    return p


def check_args(args):
    """Flag values that cannot work: an ``InputError`` worded as argparse does."""
    def bad(flag, what):
        raise InputError(f'argument --{flag}: {what}')
    for flag in ('batch_size', 'epochs', 'feature_batch_size', 'head_num_heads'):
        if getattr(args, flag) < 1:
            bad(flag, f'must be at least 1 (got {getattr(args, flag)})')
    for flag in ('num_patches', 'depth', 'num_heads', 'input_size', 'embed_dim'):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            bad(flag, f'must be at least 1 (got {getattr(args, flag)})')
    if not all(np.isfinite(v) and v > 0 for v in args.lr):
        bad('lr', f'must be positive (got {args.lr})')
    if not all(np.isfinite(v) and v >= 0 for v in args.weight_decay):
        bad('weight_decay', f'must be zero or positive (got {args.weight_decay})')
    for flag in ('lr', 'weight_decay', 'seeds'):   # a repeated seed would count one run twice in mean and std
        if len(set(getattr(args, flag))) < len(getattr(args, flag)):
            bad(flag, 'a value is given twice')
    if args.lr_decay is not None and not 0 < args.lr_decay <= 1:
        bad('lr_decay', f'must be in (0, 1] (got {args.lr_decay})')
    if args.lr_decay is not None and args.sched in ('cosine', 'none'):
        bad('lr_decay', f'only used with --sched exp (got --sched {args.sched})')
    if args.cache_ram_gb < 0:
        bad('cache_ram_gb', f'must be zero or positive (got {args.cache_ram_gb})')
    if args.baseline is None and not args.resume:
        raise InputError('give --resume <LV-MAE checkpoint>, or --baseline raw to probe the raw embeddings')
    if args.baseline == 'raw' and args.resume:
        raise InputError('--baseline raw uses no encoder: leave out --resume')


def file_sha256(path):
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        for chunk in iter(lambda: f.read(1 << 24), b''):
            h.update(chunk)
    return h.hexdigest()


def protocol(args):
    """Everything that decides a number in the table, for ``results.json``."""
    sched, decay = schedule(args)
    one = lambda v: v[0] if len(v) == 1 else list(v)
    return {'optimizer': 'Adam', 'amsgrad': not args.no_amsgrad, 'lr': one(args.lr),
            'weight_decay': one(args.weight_decay),
            'schedule': {'cosine': f'CosineAnnealingLR(T_max={args.epochs}), per epoch',
                         'exp': f'ExponentialLR(gamma={decay}), per epoch', 'none': 'constant'}[sched],
            'epochs': args.epochs, 'batch_size': args.batch_size, 'drop_last': not args.keep_last_batch,
            'selection': SELECTION, 'grid_selection': GRID_SELECTION if len(args.lr) * len(args.weight_decay) > 1
            else None, 'feature_dtype': args.feature_dtype if args.baseline != 'raw' else None,
            'seeds': list(args.seeds), 'baseline': args.baseline,
            'checkpoint': os.path.basename(args.resume) if args.resume else None,
            'checkpoint_sha256': file_sha256(args.resume) if args.resume else None}


class EncoderSpec:
    """The frozen encoder of a run, its architecture worked out once (``resolve_arch``): the
    pretrained checkpoint, an untrained one of the same architecture per seed (``random_init``), or
    none (``raw``)."""

    def __init__(self, args):
        self.kind = args.baseline or 'pretrained'
        self.arch, self.model = None, None
        if self.kind == 'raw':
            self.num_patches = args.num_patches or PAPER_CONFIG['num_patches']
            return
        flags = {k: getattr(args, k) for k in ARCH_FLAGS}
        try:
            ckpt = load_checkpoint(args.resume, trust=args.trust_checkpoint) if args.resume else {}
        except (FileNotFoundError, RuntimeError) as e:
            raise InputError(str(e)) from None
        sd = model_state(ckpt) if ckpt else {}
        source = args.resume or 'the architecture flags'
        self.arch, notes = resolve_arch(checkpoint_args(ckpt), sd, flags, source=source, decoder=False)
        if 'num_heads' in notes:
            print(f'{source}: num_heads not stored in the checkpoint; using {self.arch["num_heads"]} (set --num_heads)')
        self.num_patches = self.arch['num_patches']
        self.device = args.device
        if self.kind == 'pretrained':
            model = self._build()
            try:
                load_model_state(model, sd, args.resume, strict=True, ignore_prefixes=DECODER_PREFIXES)
            except RuntimeError as e:
                raise ArchitectureError(str(e)) from None
            self.model = model.eval().requires_grad_(False).to(args.device)

    @property
    def per_seed(self):
        return self.kind == 'random_init'

    @property
    def input_size(self):
        return self.arch['input_size'] if self.arch else None

    @property
    def width(self):
        return (self.arch.get('embed_dim') or self.arch['input_size']) if self.arch else None

    def encoder(self, seed):
        """The encoder for ``seed`` (``None`` for the raw baseline)."""
        if self.kind != 'random_init':
            return self.model
        torch.manual_seed(seed)
        return self._build().eval().requires_grad_(False).to(self.device)

    def _build(self):
        # the probes use the encoder only: no decoder blocks (their weights are not loaded either)
        return LVMAE(**{**self.arch, 'decoder_depth': 0})


def cache_features(args, name, raw, encoder, cache_dir):
    """``(data, featurizer)``: the featurizer's outputs cached per split (``featurizer`` is then
    ``None``), or with ``--no_cache`` the raw windows and the featurizer to run every batch."""
    featurizer = Featurizer(encoder, pooled=args.probe == 'lp', dtype=args.feature_dtype)
    if args.no_cache:
        return raw, featurizer
    data = {}
    for split, items in raw.items():
        t0 = time.time()
        rows = sum(featurizer.out_length(int(n)) for n in items.length)
        width = encoder.embed_dim if encoder is not None else items.data.shape[1]
        mmap = None
        if rows * width * 4 > args.cache_ram_gb * 2 ** 30:
            os.makedirs(cache_dir, exist_ok=True)
            mmap = os.path.join(cache_dir, f'{name}_{split}.npy')
        data[split] = items.featurize(featurizer, args.feature_batch_size, args.device, mmap)
        data[split].check_finite(f'task {name}, {split} split')
        print(f'[{name}] {split}: {len(items.labels)} videos cached in {time.time() - t0:.1f}s' +
              (f' ({mmap})' if mmap else ''))
    return data, None


def select(task, combos, runs):
    """Per (lr, wd): mean val/test over seeds; the chosen one has the best mean val (never test)."""
    grid = []
    for c, (lr, wd) in enumerate(combos):
        per_seed = [{k: r[c][k] for k in ('seed', 'best_epoch', 'val', 'test')} for r in runs]
        ok = all(r['val'] is not None for r in per_seed)
        tests, vals = np.array([r['test'] for r in per_seed], float), np.array([r['val'] for r in per_seed], float)
        grid.append({'lr': lr, 'weight_decay': wd, 'val_mean': float(vals.mean()) if ok else None,
                     'test_mean': float(tests.mean()) if ok else None, 'test_std': float(tests.std()) if ok else None,
                     'diverged': any(r[c]['diverged'] for r in runs), 'per_seed': per_seed})
    usable = [c for c, g in enumerate(grid) if g['val_mean'] is not None]
    if not usable:
        raise NonFiniteError(f'task {task.name}: every (lr, weight_decay) combination diverged in some seed before '
                             f'its first epoch ended; lower --lr')
    sign = 1 if task.regression else -1
    chosen = min(usable, key=lambda c: (sign * grid[c]['val_mean'], c))
    return grid, chosen


def run_task(args, name, spec, cache_dir, in_group=False, log_file=None):
    """One task over all seeds: the ``results.json`` entry (``{'skipped': reason}`` when its test
    split has no embeddings in a group run) and whether the embeddings came from a random encoder."""
    task = get_task(name, args.data_path)
    folder = os.path.join(args.data_path, name)
    test_csv = os.path.join(folder, 'test.csv')
    if not has_embeddings(test_csv):
        reason = f'no test embeddings ({test_csv} missing, without rows, or none of its embedding files exists)'
        if in_group:
            print(f'[{name}] skipped: {reason}')
            return {'skipped': reason}, False
        raise EmbeddingError(f'task {name}: {reason}')
    raw, counts, random_init, input_size = {}, {}, False, spec.input_size
    for split in SPLITS:
        seqs, labels, rnd = load_split(os.path.join(folder, f'{split}.csv'), task, input_size)
        input_size = input_size or seqs[0].shape[1]
        random_init |= rnd
        longer = sum(s.shape[0] > spec.num_patches for s in seqs)
        if longer:
            print(f'[{name}] {split}: {longer} videos longer than {spec.num_patches} segments: ' +
                  ('outputs averaged over windows' if args.long_video else f'first {spec.num_patches} used'))
        raw[split] = Items.from_videos(seqs, labels, spec.num_patches, args.long_video)
        counts[split] = len(seqs)
    dim = spec.width or input_size
    combos = [(lr, wd) for lr in args.lr for wd in args.weight_decay]
    log_dir = args.log_dir or os.path.join(args.output_dir, 'tensorboard')
    runs, data = [], None
    for seed in args.seeds:
        if data is None or spec.per_seed:
            data = None  # free the previous seed's cache first
            data, featurizer = cache_features(args, name, raw, spec.encoder(seed), cache_dir)
        writer = SummaryWriter(os.path.join(log_dir, name, f'seed{seed}'))
        r = train_seed(args, task, data, dim, featurizer, seed, combos, writer, log_file)
        writer.close()
        for c in r:
            if c['val'] is not None:
                print(f'[{name}] seed {seed}' + (f' lr {c["lr"]:g} wd {c["weight_decay"]:g}' if len(combos) > 1 else '')
                      + f': best val {task.metric} {c["val"]:.4f} at epoch {c["best_epoch"]}, test {c["test"]:.4f}')
        runs.append(r)
    shutil.rmtree(cache_dir, ignore_errors=True)
    grid, chosen = select(task, combos, runs)
    best = grid[chosen]
    return {'metric': task.metric, 'test_mean': best['test_mean'], 'test_std': best['test_std'],
            'val_mean': best['val_mean'], 'per_seed': best['per_seed'], 'num_videos': counts,
            'num_classes': task.num_classes, 'lr': best['lr'], 'weight_decay': best['weight_decay'],
            'grid': grid}, random_init


def main(args):
    check_args(args)
    args.device = default_device(args.device)
    if args.device == 'cpu':
        keep_freed_memory()   # the heads' large gradients are reused, not faulted in again every step
    names = expand_tasks(args.task)
    in_group = len(names) > 1
    for name in names:   # a name that is no task is bad input, found before any task runs
        try:
            get_task(name, args.data_path)
        except ValueError as e:
            raise InputError(f'argument --task: {e}') from None
    if in_group and not any(has_embeddings(os.path.join(args.data_path, n, 'test.csv')) for n in names):
        raise EmbeddingError(f'--data_path {args.data_path}: no task of {", ".join(names)} has test embeddings '
                             '(<task>/test.csv missing, without rows, or none of its embedding files exists)')
    lock = FolderLock(args.output_dir, 'probe run')
    # a per-run name: two runs never share a memory-mapped cache file, even on another output folder's lock
    cache_dir = os.path.join(args.output_dir, f'feature_cache_{os.getpid()}_{uuid.uuid4().hex[:8]}')
    try:
        spec = EncoderSpec(args)
        summary = {'probe': args.probe, 'baseline': args.baseline, 'checkpoint': args.resume or None,
                   'random_encoder': False, 'protocol': protocol(args), 'tasks': {}, 'classification_avg': None}
        regression = {}
        with open(os.path.join(args.output_dir, 'log.txt'), 'a') as log_file:
            for name in names:
                regression[name] = get_task(name, args.data_path).regression
                summary['tasks'][name], random_init = run_task(args, name, spec, cache_dir, in_group, log_file)
                summary['random_encoder'] |= random_init
                summary['classification_avg'] = classification_avg(summary['tasks'])
                md = write_results(args.output_dir, summary, regression)
    finally:
        shutil.rmtree(cache_dir, ignore_errors=True)
        lock.release()
    print(md)
    return summary
