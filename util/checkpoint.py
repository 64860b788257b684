"""Checkpoint files as in MAE: ``{'model', 'optimizer', 'epoch', 'scaler', 'args'}``, written atomically.

Loading never runs code from a file by itself: checkpoints are read with ``weights_only`` (tensors,
plain containers and numbers; ``argparse.Namespace`` is allowed too, as the original LV-MAE release
stored its ``args`` as one). Our own checkpoints store ``args`` as a plain dict of JSON values. A file
that holds other Python objects loads only with ``trust=True`` (the scripts' ``--trust_checkpoint``),
which unpickles it fully: that can run code from the file, so only for files you trust.
"""
import argparse
import json
import pickle

import torch

from util.errors import InputError
from util.fileio import atomic_write


class CheckpointError(InputError, RuntimeError):
    """A checkpoint that cannot be read, or does not fit the model; the message names the file."""


def plain_args(args):
    """``args`` (a Namespace or dict) as a dict of JSON values (others become strings): what our
    checkpoints store, so that they load with ``weights_only``."""
    d = vars(args) if isinstance(args, argparse.Namespace) else dict(args)
    return json.loads(json.dumps(d, default=str))


def save_checkpoint(path, state):
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_checkpoint(path, trust=False):
    """The checkpoint at ``path`` as a dict. ``trust=True`` allows full unpickling of a file that
    weights-only loading refuses (it can run code from the file); otherwise such a file is an error
    that says what it holds and how to opt in."""
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            ckpt = torch.load(path, map_location='cpu', weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f'{path}: checkpoint not found') from None
    except IsADirectoryError:
        raise CheckpointError(f'{path}: is a folder, not a checkpoint file') from None
    except pickle.UnpicklingError as e:
        what = _unpickling_reason(e)
        if not trust:
            if 'Unsupported global' in what:
                raise CheckpointError(
                    f'{path}: holds Python objects other than tensors, numbers and argparse args, which safe '
                    f'loading refuses ({what}); loading it would need full unpickling, which can run code from '
                    f'the file: if you trust this file, pass --trust_checkpoint') from None
            raise CheckpointError(f'{path}: unreadable checkpoint (safe loading: {what}; if this is a '
                                  f'checkpoint you trust, --trust_checkpoint tries full unpickling)') from None
        print(f'warning: {path}: loading with full unpickling (--trust_checkpoint): {what}')
        ckpt = _load_full(path)
    except Exception as e:
        raise CheckpointError(f'{path}: unreadable checkpoint ({type(e).__name__}: {e})') from None
    if not isinstance(ckpt, dict):
        raise CheckpointError(f'{path}: checkpoint is a {type(ckpt).__name__}, expected a dict')
    return ckpt


def _unpickling_reason(e):
    """What weights-only loading refused, in one line (e.g. ``Unsupported global: GLOBAL
    mymodule.MyClass``): what follows torch's ``WeightsUnpickler error:``, else the first line."""
    text = str(e)
    if 'WeightsUnpickler error:' in text:
        rest = text.split('WeightsUnpickler error:', 1)[1].strip()
        if rest:
            return rest.splitlines()[0].split(' was not an allowed global')[0].strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0] if lines else type(e).__name__


def _load_full(path):
    try:
        return torch.load(path, map_location='cpu', weights_only=False)
    except Exception as e:
        raise CheckpointError(f'{path}: unreadable checkpoint ({type(e).__name__}: {e})') from None


def checkpoint_args(ckpt):
    """The ``args`` stored in a checkpoint as a plain dict (Namespace or dict; {} when absent)."""
    args = ckpt.get('args')
    if isinstance(args, argparse.Namespace):
        return dict(vars(args))
    return dict(args) if isinstance(args, dict) else {}


def model_state(ckpt):
    """The model's state dict in a checkpoint (``ckpt['model']``, or the file itself when it is a bare
    state dict), without the ``module.`` prefix of a DistributedDataParallel-wrapped model."""
    sd = ckpt.get('model', ckpt)
    return {k[len('module.'):] if k.startswith('module.') else k: v for k, v in sd.items()}


def load_model_state(model, state_dict, path, strict=True, ignore_prefixes=()):
    """Load ``state_dict`` into ``model``; shape mismatches and missing/unexpected names raise an
    error that lists the parameters and both shapes. Names starting with ``ignore_prefixes`` (for
    example the decoder, when only the encoder is needed) are skipped on both sides."""
    keep = lambda k: not any(k.startswith(p) for p in ignore_prefixes)
    own = {k: v for k, v in model.state_dict().items() if keep(k)}
    given = {k: v for k, v in state_dict.items() if keep(k)}
    shape = [f'{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}'
             for k, v in given.items() if k in own and v.shape != own[k].shape]
    missing = sorted(set(own) - set(given))
    unexpected = sorted(set(given) - set(own))
    problems = []
    if shape:
        problems.append('shape mismatch (check --depth/--input_size/--num_patches/... against the '
                        'checkpoint):\n  ' + '\n  '.join(shape))
    if strict and missing:
        problems.append('missing in checkpoint: ' + ', '.join(missing[:20]) + (' ...' if len(missing) > 20 else ''))
    if strict and unexpected:
        problems.append('not in model: ' + ', '.join(unexpected[:20]) + (' ...' if len(unexpected) > 20 else ''))
    if problems:
        raise CheckpointError(f'{path}: checkpoint does not fit the model; ' + '\n'.join(problems))
    model.load_state_dict(given, strict=False)
