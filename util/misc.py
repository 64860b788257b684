"""Distributed set-up (torchrun), metric logging, checkpoint save and resume, in the style of MAE."""
import datetime
import glob
import json
import os
import re
import time
from collections import defaultdict, deque

import torch
import torch.distributed as dist

from util.checkpoint import (CheckpointError, checkpoint_args, load_checkpoint, load_model_state,
                             load_optimizer_state, model_state, plain_args, save_checkpoint, scaler_state)
from util.errors import InputError
from util.fileio import atomic_write_text


# ---------------------------------------------------------------- distributed
def init_distributed_mode(args):
    """torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; without them this is one process.
    Sets ``args.rank``, ``args.world_size``, ``args.gpu``, ``args.distributed``; NCCL on GPU, Gloo on CPU."""
    args.device = default_device(args.device)
    env_world = int(os.environ.get('WORLD_SIZE', 1))
    if args.world_size is not None and args.world_size != env_world:
        how = 'torchrun reports' if 'WORLD_SIZE' in os.environ else 'a plain python launch is'
        raise InputError(f'--world_size {args.world_size} but {how} {env_world} process(es); launch with '
                         f'torchrun --nproc_per_node N (times --nnodes) matching --world_size, or drop --world_size')
    args.world_size = env_world
    args.rank = int(os.environ.get('RANK', 0))
    args.distributed = 'RANK' in os.environ and env_world > 1
    # under torchrun each process takes the GPU of its LOCAL_RANK; one process keeps --device's index
    args.gpu = int(os.environ['LOCAL_RANK']) if 'LOCAL_RANK' in os.environ else torch.device(args.device).index or 0
    if args.device.startswith('cuda'):
        torch.cuda.set_device(args.gpu)
        args.device = f'cuda:{args.gpu}'
    if args.distributed:
        backend = 'nccl' if args.device.startswith('cuda') else 'gloo'
        dist.init_process_group(backend, init_method='env://', world_size=args.world_size, rank=args.rank)
        dist.barrier()
    setup_for_distributed(args.rank == 0)


def setup_for_distributed(is_master):
    """Only the main process prints (``print(..., force=True)`` prints everywhere); console lines start
    with the time."""
    import builtins
    builtin_print = builtins.__dict__.get('_lvmae_print', builtins.print)
    builtins._lvmae_print = builtin_print

    def print_fn(*args, **kwargs):
        if is_master or kwargs.pop('force', False):
            if kwargs.get('file') is None:   # console lines get the time; other files (stderr) as given
                args = (datetime.datetime.now().strftime('[%H:%M:%S]'),) + args
            builtin_print(*args, **kwargs)
    builtins.print = print_fn


def is_dist():
    return dist.is_available() and dist.is_initialized()


def get_world_size():
    return dist.get_world_size() if is_dist() else 1


def get_rank():
    return dist.get_rank() if is_dist() else 0


def is_main_process():
    return get_rank() == 0


def all_reduce_sum(values, device):
    """Sum a list of floats over processes (float64)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if is_dist():
        dist.all_reduce(t)
    return t.tolist()


def all_reduce_mean(value, device):
    return all_reduce_sum([value], device)[0] / get_world_size()


# ---------------------------------------------------------------- logging
class MetricLogger:
    """Running averages of scalars and a periodic line with samples/s and ETA."""

    def __init__(self, window=20):
        self.meters = defaultdict(lambda: deque(maxlen=window))
        self.totals = defaultdict(lambda: [0.0, 0])

    def update(self, **kwargs):
        for k, v in kwargs.items():
            self.meters[k].append(float(v))
            self.totals[k][0] += float(v)
            self.totals[k][1] += 1

    def global_avg(self):
        return {k: s / max(n, 1) for k, (s, n) in self.totals.items()}

    def log_every(self, iterable, num_steps, print_freq, header, samples_per_step):
        """Yield from ``iterable`` (at most ``num_steps`` items), printing every ``print_freq`` steps."""
        start = last = time.time()
        for i, obj in enumerate(iterable):
            if i >= num_steps:
                break
            yield obj
            if (i + 1) % print_freq == 0 or i + 1 == num_steps:
                now = time.time()
                steps = (i + 1) % print_freq or print_freq
                speed = samples_per_step * steps / max(now - last, 1e-9)
                eta = (now - start) / (i + 1) * (num_steps - i - 1)
                vals = '  '.join(f'{k}: {sum(v) / len(v):.4g}' for k, v in self.meters.items())
                print(f'{header} [{i + 1}/{num_steps}]  {vals}  samples/s: {speed:.1f}  '
                      f'eta: {datetime.timedelta(seconds=int(eta))}')
                last = now
        print(f'{header} done in {datetime.timedelta(seconds=int(time.time() - start))}')


# ---------------------------------------------------------------- checkpoints
def save_model(args, epoch, model_without_ddp, optimizer, scaler, start_epoch=None):
    """``<output_dir>/checkpoint-<epoch>.pth`` as in MAE, written atomically by the main process.
    ``start_epoch``: the value its ``args`` record (the command's ``--start_epoch``, not the epoch a
    resumed run started at: a resumed run's checkpoints are then those of an uninterrupted one)."""
    if is_main_process():
        path = os.path.join(args.output_dir, f'checkpoint-{epoch}.pth')
        saved = plain_args(args) if start_epoch is None else {**plain_args(args), 'start_epoch': start_epoch}
        save_checkpoint(path, {'model': model_without_ddp.state_dict(), 'optimizer': optimizer.state_dict(),
                               'epoch': epoch, 'scaler': scaler_state(scaler), 'args': saved})
        print(f'saved {path}')
    if is_dist():
        dist.barrier()


def newest_checkpoint(output_dir):
    """Path of ``checkpoint-<N>.pth`` with the largest N in ``output_dir`` (None if there is none)."""
    found = []
    for p in glob.glob(os.path.join(glob.escape(output_dir), 'checkpoint-*.pth')):
        m = re.fullmatch(r'checkpoint-(\d+)\.pth', os.path.basename(p))
        if m:
            found.append((int(m.group(1)), p))
    return max(found)[1] if found else None


def check_same_architecture(ckpt_args, args, path, keys):
    """Resuming with other architecture flags than the checkpoint's is an error (shapes are checked
    when loading the weights; this catches the others, such as the number of heads)."""
    diff = [f'--{k} {getattr(args, k)} (checkpoint: {ckpt_args[k]})' for k in keys
            if k in ckpt_args and hasattr(args, k) and ckpt_args[k] != getattr(args, k)]
    if diff:
        raise CheckpointError(f'{path}: this run\'s architecture differs from the checkpoint\'s: '
                              f'{", ".join(diff)}; use the checkpoint\'s values')


def resume(args, model_without_ddp, optimizer, scaler, arch_keys=()):
    """Load ``--resume`` or, unless ``--no_auto_resume``, the newest checkpoint in ``--output_dir``;
    sets ``args.start_epoch`` to the epoch after the checkpoint's. Full unpickling only for ``--resume``
    with ``--trust_checkpoint``, never for a checkpoint found by auto-resume. ``arch_keys``: flags that
    must equal the checkpoint's."""
    path = args.resume or (None if args.no_auto_resume else newest_checkpoint(args.output_dir))
    if is_dist():   # every process resumes from rank 0's choice (its folder may be the only one written to)
        choice = [path]
        dist.broadcast_object_list(choice, src=0)
        path = choice[0]
    if not path:
        return
    trust = bool(args.resume) and getattr(args, 'trust_checkpoint', False)
    try:
        ckpt = load_checkpoint(path, trust=trust)
    except CheckpointError as e:
        if args.resume:
            raise
        raise CheckpointError(f'{e} (found by auto-resume in --output_dir; --trust_checkpoint applies to '
                              f'--resume only)') from None
    check_same_architecture(checkpoint_args(ckpt), args, path, arch_keys)
    load_model_state(model_without_ddp, model_state(ckpt), path)
    if 'optimizer' in ckpt and 'epoch' in ckpt:
        load_optimizer_state(optimizer, ckpt['optimizer'], model_without_ddp, path)
        if ckpt.get('scaler'):
            scaler.load_state_dict(ckpt['scaler'])
        args.start_epoch = ckpt['epoch'] + 1
        print(f'resumed from {path}: continuing at epoch {args.start_epoch}')
    else:
        print(f'loaded model weights from {path} (no optimizer state: starting at epoch {args.start_epoch})')


# ---------------------------------------------------------------- output folder
STALE_TMP_PATTERNS = ('.checkpoint-*.tmp', '.log.txt.*.tmp')


def sweep_stale_tmp(output_dir):
    """Remove temporary files left by a killed checkpoint or log write (``atomic_write``'s names).
    Call only while holding the folder's lock: no other run can be writing them."""
    removed = []
    for pattern in STALE_TMP_PATTERNS:
        for p in glob.glob(os.path.join(glob.escape(output_dir), pattern)):
            os.remove(p)
            removed.append(os.path.basename(p))
    if removed:
        print(f'removed {len(removed)} temporary file(s) of an interrupted write: {", ".join(sorted(removed))}')
    return removed


def trim_log(output_dir, start_epoch):
    """Keep only the ``log.txt`` lines of epochs before ``start_epoch`` (rewritten atomically), so that a
    resumed run does not log the epochs after its checkpoint twice; lines that are not a JSON object
    with an ``epoch`` (a line cut by a kill) go too."""
    path = os.path.join(output_dir, 'log.txt')
    if not os.path.isfile(path):
        return
    keep = []
    with open(path) as f:
        for line in f:
            try:
                epoch = json.loads(line)['epoch']
            except (ValueError, TypeError, KeyError):
                continue
            if isinstance(epoch, int) and epoch < start_epoch:
                keep.append(line if line.endswith('\n') else line + '\n')
    atomic_write_text(path, ''.join(keep))
# ---------------------------------------------------------------- device
def default_device(name='auto'):
    """The ``--device`` every script takes: ``auto`` is ``cuda:$LOCAL_RANK`` under torchrun, else
    ``cuda`` when a GPU is available, else ``cpu``; any other name is returned unchanged. A CUDA device
    on a machine without one is an ``InputError``."""
    if name != 'auto':
        if str(name).startswith('cuda') and not torch.cuda.is_available():
            raise InputError(f'--device {name} but CUDA is not available; use --device cpu (or auto)')
        return name
    if not torch.cuda.is_available():
        return 'cpu'
    return f'cuda:{os.environ["LOCAL_RANK"]}' if 'LOCAL_RANK' in os.environ else 'cuda'


def keep_freed_memory():
    """On Linux with glibc, make freed memory reusable without new page faults: glibc hands every
    allocation above a few MB to ``mmap`` and returns it to the system when freed, so each new large
    tensor (a CPU step's activations and gradients: 16 to 100 MB each for probe heads of width 1,024)
    is faulted in page by page again. ``mallopt`` keeps them in the heap instead (no mmap, trimming
    only above 1 GiB free): after a few steps the heap has settled and the same memory serves every
    step (the process keeps its peak heap). Numerics are unchanged. Returns whether it applied;
    elsewhere a no-op."""
    import ctypes
    import platform
    if platform.system() != 'Linux' or platform.libc_ver()[0] != 'glibc':
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, 2 ** 30))
