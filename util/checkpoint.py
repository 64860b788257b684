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


def scaler_state(scaler):
    """``scaler.state_dict()`` for a checkpoint; a disabled scaler (bf16 or CPU runs) stores a fresh
    scaler's state instead of ``{}``, which the original release's resume (an fp16 GradScaler) refuses."""
    return scaler.state_dict() or torch.amp.GradScaler('cpu').state_dict()


def save_checkpoint(path, state):
    """``state`` to ``path``, written atomically. Saved through a file object: given a path,
    ``torch.save`` names the archive's records after the file (here the temporary file's random name),
    so the same state gave other bytes at every save."""
    def write(tmp):
        with open(tmp, 'wb') as f:
            torch.save(state, f)
    atomic_write(path, write)


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
        what = load_error_reason(e)
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


def load_error_reason(e):
    """Why ``torch.load`` failed, in one line: what weights-only loading refused (e.g. ``Unsupported
    global: GLOBAL mymodule.MyClass``, what follows torch's ``WeightsUnpickler error:``), else the
    first line of the message."""
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


FIXED_TABLES = ('pos_embed', 'decoder_pos_embed')   # sin-cos tables the model builds itself


def load_model_state(model, state_dict, path, strict=True, ignore_prefixes=()):
    """Load ``state_dict`` into ``model``; shape mismatches and missing/unexpected names raise an
    error that lists the parameters and both shapes. Names starting with ``ignore_prefixes`` (for
    example the decoder, when only the encoder is needed) are skipped on both sides. A checkpoint
    without the fixed position tables (``FIXED_TABLES``) keeps the model's own."""
    keep = lambda k: not any(k.startswith(p) for p in ignore_prefixes)
    own = {k: v for k, v in model.state_dict().items() if keep(k)}
    given = {k: v for k, v in state_dict.items() if keep(k)}
    shape = [f'{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}'
             for k, v in given.items() if k in own and v.shape != own[k].shape]
    missing = sorted(set(own) - set(given) - set(FIXED_TABLES))
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


def load_optimizer_state(optimizer, state, model, path):
    """``optimizer.load_state_dict(state)``, checked: a state of other parameter groups, or whose
    moments do not have the shapes of the parameters they are given to (the checkpoint's optimizer
    listed its parameters in another order), is an error instead of a failure, or silently wrong
    moments, at the first step."""
    why = ('its parameter groups differ from this run\'s; a checkpoint without "optimizer" resumes the '
           'weights alone')
    try:
        optimizer.load_state_dict(state)
    except (ValueError, KeyError, TypeError, IndexError) as e:
        raise CheckpointError(f'{path}: the optimizer state does not fit the model ({e}); {why}') from None
    for name, p in model.named_parameters():
        for k, v in optimizer.state.get(p, {}).items():
            if torch.is_tensor(v) and v.ndim and v.shape != p.shape:
                raise CheckpointError(f'{path}: the optimizer state does not fit the model ({k} of shape '
                                      f'{tuple(v.shape)} for {name} of shape {tuple(p.shape)}); {why}')


# ---------------------------------------------------------------------------------------- architecture
class ArchitectureError(InputError, ValueError, RuntimeError):
    """A flag contradicts the checkpoint's architecture, or the checkpoint does not fit the model
    (also a ValueError / RuntimeError, the types these errors had before)."""


DECODER_PREFIXES = ('decoder_', 'mask_token')   # parameters a frozen encoder does not need


def model_config_keys():
    """Keyword arguments of ``models_lvmae.LVMAE`` that a checkpoint's ``args`` may carry: the shape
    keys (``ARCH_KEYS``) and every other configuration keyword of the model (for example an input
    scale), read from its signature so that a key added to the model is carried without a change here."""
    import inspect

    from models_lvmae import ARCH_KEYS, LVMAE
    sig = [k for k in inspect.signature(LVMAE).parameters if k not in ('self', 'norm_layer')]
    return tuple(ARCH_KEYS) + tuple(k for k in sig if k not in ARCH_KEYS)


def shape_arch(sd):
    """What a state dict's parameter shapes say about the architecture (the keys it can tell)."""
    arch = {}
    if 'pos_embed' in sd:
        arch['num_patches'] = sd['pos_embed'].shape[1] - 1
        width = sd['pos_embed'].shape[-1]
        arch['input_size'] = sd['input_proj.weight'].shape[1] if 'input_proj.weight' in sd else width
        if width != arch['input_size']:
            arch['embed_dim'] = width
    blocks = {int(k.split('.')[1]) for k in sd if k.startswith('blocks.')}
    if blocks:
        arch['depth'] = max(blocks) + 1
    if 'blocks.0.mlp.fc1.weight' in sd:
        fc1 = sd['blocks.0.mlp.fc1.weight'].shape
        arch['mlp_ratio'] = fc1[0] / fc1[1]
    if 'decoder_embed.weight' in sd:
        arch['decoder_embed_dim'] = sd['decoder_embed.weight'].shape[0]
    dec = {int(k.split('.')[1]) for k in sd if k.startswith('decoder_blocks.')}
    if dec:
        arch['decoder_depth'] = max(dec) + 1
    return arch


def resolve_arch(ckpt_args=None, sd=None, flags=None, source='checkpoint', decoder=True):
    """The ``LVMAE`` keyword arguments of a model, worked out once.

    Each configuration key takes, in order: an explicit flag (``flags[k]`` not None), the
    checkpoint's stored args, what its parameter shapes say, the paper's configuration
    (``models_lvmae.PAPER_CONFIG``). A flag that contradicts the checkpoint's stored ``num_heads`` is
    an error (head counts leave no trace in the shapes); other contradictions show up as shape
    mismatches when the weights are loaded; heads that do not divide their width are an error too.
    ``decoder=False`` (a user of the encoder alone) leaves the decoder's head count unchecked.
    Returns ``(kwargs, notes)``; ``notes`` lists the head counts (``num_heads``, and
    ``decoder_num_heads`` when the state dict has a decoder) that fell back to the paper's values
    although a checkpoint was given."""
    from models_lvmae import PAPER_CONFIG
    ckpt_args, sd, flags = ckpt_args or {}, sd or {}, flags or {}
    keys = model_config_keys()
    stored = {k: ckpt_args[k] for k in keys if ckpt_args.get(k) is not None}
    shapes = shape_arch(sd)
    given = {k: v for k, v in flags.items() if k in keys and v is not None}
    for k in ('num_heads', 'decoder_num_heads') if decoder else ('num_heads',):
        if k in given and stored.get(k) not in (None, given[k]):
            raise ArchitectureError(f'{source}: --{k} {given[k]} but the checkpoint was trained with {k}={stored[k]}')
    arch, notes = {}, []
    for k in keys:
        for src in (given, stored, shapes, PAPER_CONFIG):
            if k in src:
                arch[k] = src[k]
                break
        else:
            continue
        heads_unknown = k not in given and k not in stored
        if sd and heads_unknown and (k == 'num_heads' or (decoder and k == 'decoder_num_heads' and 'decoder_depth' in shapes)):
            notes.append(k)
    width = arch.get('embed_dim') or arch['input_size']
    checks = [('num_heads', width, 'encoder width')]
    if decoder:
        checks.append(('decoder_num_heads', arch.get('decoder_embed_dim'), 'decoder width'))
    for heads, dim, name in checks:
        if dim and arch.get(heads) and dim % arch[heads]:
            raise ArchitectureError(f'{source}: --{heads} {arch[heads]} does not divide the {name} {dim}')
    if width % 2:
        raise ArchitectureError(f'{source}: the encoder width {width} must be even (sin-cos positions)')
    return arch, notes
