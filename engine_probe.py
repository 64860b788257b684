"""Training and evaluation of a probe head on a frozen encoder's features (docs/EVAL.md).

One call of ``train_seed`` trains, for one task and one seed, the head of every (learning rate,
weight decay) combination of the run side by side (the copies of one ``models_probe`` head: one
batched pass over each batch for all of them; one combination is the ordinary single-head probe).
Each head is evaluated on val and test after every epoch and keeps the test score of its epoch with
the best val score, the later epoch on ties (the original release's rule). The orchestration (tasks, seeds,
encoder, feature cache, results) is in ``main_probe.py``.
"""
import json
import math

import torch
import torch.nn.functional as F

from models_probe import make_head, per_copy_parameters
from util.errors import InputError
from util.features import NonFiniteError


def head_outputs(grid, items, videos, featurizer, device):
    """Outputs ``[G, len(videos), outputs]`` of the grid's heads per video (mean over its windows);
    ``featurizer`` when running uncached (``None`` on cached features)."""
    x, lengths, owner = items.batch(videos, device)
    if featurizer is not None:
        x, lengths = featurizer(x, lengths)
    out = grid(x, lengths).float()
    summed = torch.zeros(out.shape[0], len(videos), out.shape[2], device=device).index_add(1, owner, out)
    return summed / torch.bincount(owner, minlength=len(videos))[None, :, None]


def grid_loss(out, y, task):
    """Per-head loss ``[G]``: MSE (regression) or cross-entropy, each the mean over the batch."""
    if out.shape[0] == 1:
        return (F.mse_loss(out[0, :, 0], y) if task.regression else F.cross_entropy(out[0], y))[None]
    if task.regression:
        return ((out[..., 0] - y) ** 2).mean(1)
    return F.cross_entropy(out.transpose(1, 2), y.expand(out.shape[0], -1), reduction='none').mean(1)


@torch.no_grad()
def evaluate(grid, items, task, featurizer, batch_size, device):
    """``(metric [G], loss [G])``: top-1 % or MSE over the split, per head."""
    grid.eval()
    outs = [head_outputs(grid, items, torch.arange(i, min(i + batch_size, len(items.labels))), featurizer, device)
            for i in range(0, len(items.labels), batch_size)]
    out, y = torch.cat(outs, dim=1), items.labels.to(device)
    loss = grid_loss(out, y, task)
    metric = loss.tolist() if task.regression else [a * 100 for a in (out.argmax(2) == y).float().mean(1).tolist()]
    return metric, loss.tolist()


def schedule(args):
    """``(name, lr_decay)`` of ``--sched`` / ``--lr_decay``: cosine annealing over ``--epochs`` (the
    original release; the default), 'exp' (ExponentialLR by ``--lr_decay``, default 0.9; the paper's AP
    schedule, and the default when only ``--lr_decay`` is given) or 'none'."""
    name = args.sched or ('exp' if args.lr_decay is not None else 'cosine')
    return name, (args.lr_decay if args.lr_decay is not None else 0.9) if name == 'exp' else None


def make_scheduler(opt, args):
    """The learning-rate schedule of ``schedule(args)``, stepped once per epoch."""
    name, decay = schedule(args)
    if name == 'cosine':
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.epochs)
    if name == 'exp':
        return torch.optim.lr_scheduler.ExponentialLR(opt, decay)
    return None


def num_train_batches(n, batch_size, drop_last):
    return n // batch_size if drop_last else math.ceil(n / batch_size)


def train_seed(args, task, data, dim, featurizer, seed, combos=None, log_writer=None, log_file=None):
    """Train one head per ``(lr, weight_decay)`` of ``combos`` (default ``args.lr`` x ``args.weight_decay``)
    from the same initial weights and data order (both from ``seed``). ``data``: split -> ``Items``.
    Returns one ``{'seed', 'lr', 'weight_decay', 'best_epoch', 'val', 'test', 'epochs': [...]}`` per
    combination. A non-finite loss stops the run with an error naming task, seed and epoch (in a
    sweep, a diverging head only stops counting, unless all heads diverge)."""
    device = args.device
    combos = combos or [(lr, wd) for lr in args.lr for wd in args.weight_decay]
    torch.manual_seed(seed)
    num_out = 1 if task.regression else task.num_classes
    if args.probe == 'ap' and dim % args.head_num_heads:
        raise InputError(f'argument --head_num_heads: {args.head_num_heads} does not divide the feature width {dim}')
    grid = make_head(args.probe, dim, num_out, args.head_num_heads, prepend_cls=args.baseline == 'raw',
                     copies=len(combos)).to(device)
    groups = [{'params': params, 'lr': lr, 'weight_decay': wd}
              for params, (lr, wd) in zip(per_copy_parameters(grid), combos)]
    opt = torch.optim.Adam(groups, amsgrad=not args.no_amsgrad,
                           fused=torch.device(device).type in ('cpu', 'cuda'))  # one kernel per copy
    sched = make_scheduler(opt, args)
    gen = torch.Generator().manual_seed(seed)
    train = data['train']
    n = len(train.labels)
    drop_last = not args.keep_last_batch
    n_batches = num_train_batches(n, args.batch_size, drop_last)
    if n_batches == 0:
        raise InputError(f'task {task.name}: {n} training videos, fewer than --batch_size {args.batch_size}, and the '
                         f'last partial batch is dropped (as released): lower --batch_size or add --keep_last_batch')
    y_all = train.labels.to(device)
    G = len(combos)
    alive = [True] * G
    best, history = [None] * G, [[] for _ in range(G)]
    where = lambda g, epoch: (f'task {task.name}, seed {seed}, epoch {epoch}' +
                              (f', lr {combos[g][0]:g}, weight decay {combos[g][1]:g}' if G > 1 else ''))
    for epoch in range(args.epochs):
        grid.train()
        perm = torch.randperm(n, generator=gen)
        total, seen = torch.zeros(G, device=device), 0
        for i in range(n_batches):
            videos = perm[i * args.batch_size:(i + 1) * args.batch_size]
            losses = grid_loss(head_outputs(grid, train, videos, featurizer, device), y_all[videos.to(device)], task)
            opt.zero_grad()
            losses.sum().backward()
            opt.step()
            total += losses.detach() * len(videos)
            seen += len(videos)
        lrs = [grp['lr'] for grp in opt.param_groups]
        if sched is not None:
            sched.step()
        train_loss = (total / seen).tolist()
        evals = {split: evaluate(grid, data[split], task, featurizer, args.batch_size * 4, device)
                 for split in ('val', 'test')}
        for g in range(G):
            if not alive[g]:
                continue
            if not math.isfinite(train_loss[g]):
                if G == 1 or sum(alive) == 1:
                    raise NonFiniteError(f'{where(g, epoch)}: training loss is {train_loss[g]} (non-finite features or '
                                         f'labels, or a learning rate too high)')
                alive[g] = False
                print(f'[{task.name}] seed {seed}: head lr {combos[g][0]:g} wd {combos[g][1]:g} diverged at epoch '
                      f'{epoch} (loss {train_loss[g]}); only its earlier epochs count')
                continue
            for split, (_, loss) in evals.items():
                if not math.isfinite(loss[g]):
                    raise NonFiniteError(f'{where(g, epoch)}: {split} loss is {loss[g]} (non-finite labels or '
                                         f'outputs in the {split} split)')
            stats = {'task': task.name, 'seed': seed, 'epoch': epoch, 'lr': lrs[g], 'base_lr': combos[g][0],
                     'weight_decay': combos[g][1], 'train_loss': train_loss[g]}
            for split, (metric, loss) in evals.items():
                stats.update({f'{split}_{task.metric}': metric[g], f'{split}_loss': loss[g]})
            history[g].append(stats)
            val = stats[f'val_{task.metric}']
            if best[g] is None or (val <= best[g][f'val_{task.metric}'] if task.regression
                                   else val >= best[g][f'val_{task.metric}']):   # ties: the later epoch (released rule)
                best[g] = stats
            if log_file is not None:
                log_file.write(json.dumps(stats) + '\n')
                log_file.flush()
            if log_writer is not None:
                prefix = f'lr{combos[g][0]:g}_wd{combos[g][1]:g}/' if G > 1 else ''
                for k, v in stats.items():
                    if k not in ('task', 'seed', 'epoch', 'base_lr', 'weight_decay'):
                        log_writer.add_scalar(prefix + k, v, epoch)
    return [{'seed': seed, 'lr': lr, 'weight_decay': wd, 'diverged': not alive[g],
             'best_epoch': best[g]['epoch'] if best[g] else None,
             'val': best[g][f'val_{task.metric}'] if best[g] else None,
             'test': best[g][f'test_{task.metric}'] if best[g] else None, 'epochs': history[g]}
            for g, (lr, wd) in enumerate(combos)]
