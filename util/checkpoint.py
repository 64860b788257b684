"""Checkpoint files as in MAE: ``{'model', 'optimizer', 'epoch', 'scaler', 'args'}``, written atomically.

Checkpoints of the original LV-MAE release load too: same parameter names, and ``args`` may be an
``argparse.Namespace`` (allowed explicitly, so loading stays ``weights_only``; a file holding other
Python objects is loaded with full unpickling after a warning).
"""
import argparse
import pickle

import torch

from util.fileio import atomic_write


def save_checkpoint(path, state):
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_checkpoint(path):
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            ckpt = torch.load(path, map_location='cpu', weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f'{path}: checkpoint not found') from None
    except pickle.UnpicklingError as e:
        # e.g. an ``args`` holding some other Python object: the file is readable, but only by full
        # unpickling, which can run code from the file. Checkpoints are the user's own files.
        print(f'warning: {path} holds objects other than tensors and argparse args '
              f'({str(e).splitlines()[0]}); loading it with full unpickling: use only checkpoints you trust')
        ckpt = _load_full(path)
    except Exception as e:
        raise RuntimeError(f'{path}: unreadable checkpoint ({type(e).__name__}: {e})') from None
    if not isinstance(ckpt, dict):
        raise RuntimeError(f'{path}: checkpoint is a {type(ckpt).__name__}, expected a dict')
    return ckpt


def _load_full(path):
    try:
        return torch.load(path, map_location='cpu', weights_only=False)
    except Exception as e:
        raise RuntimeError(f'{path}: unreadable checkpoint ({type(e).__name__}: {e})') from None


def checkpoint_args(ckpt):
    """The ``args`` stored in a checkpoint as a plain dict (Namespace or dict; {} when absent)."""
    args = ckpt.get('args')
    if args is None:
        return {}
    return dict(vars(args)) if isinstance(args, argparse.Namespace) else dict(args)


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
        raise RuntimeError(f'{path}: checkpoint does not fit the model; ' + '\n'.join(problems))
    model.load_state_dict(given, strict=False)
