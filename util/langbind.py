"""LanguageBind video encoder: compatibility shims, loading, and the embedding call.

Step 3 imports only the video model's two modules (``video_modules()``), not the whole package: its
``__init__`` imports every modality with its processor (and ``pytorchvideo``), and ``peft`` is needed
only for LoRA models; together they cost seconds of start-up. The processor, used by the tests, comes
with the full package (``import_languagebind()``).

Two shims, applied before the package is used:
- ``pytorchvideo`` (imported by ``languagebind``) needs ``torchvision.transforms.functional_tensor``,
  which torchvision removed: alias it to ``torchvision.transforms.functional``.
- With recent ``transformers`` the model's attention fails (``KeyError: None``) unless the configs'
  ``_attn_implementation`` is set before the model is built.
"""
import importlib
import importlib.util
import os
import sys
import types
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from util.errors import InputError

DEFAULT_MODEL = 'LanguageBind/LanguageBind_Video_Huge_V1.5_FT'
ATTN = 'sdpa'
RANDOM_INIT_SEED = 0

# Randomly initialised configurations (for tests, demos and timing only). 'tiny' costs little next to
# decoding; 'huge' has the size of LanguageBind_Video_Huge (ViT-H/14 vision tower with temporal
# attention, 1024-d projection) for timing; the text tower, unused here, is kept tiny in both.
_TINY_TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=64)
RANDOM_CONFIGS = {
    'tiny': dict(projection_dim=64, vision_config=dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, patch_size=56)),
    'huge': dict(projection_dim=1024, vision_config=dict(
        hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16, patch_size=14)),
}


def import_languagebind():
    """Import the ``languagebind`` package with the torchvision shim in place."""
    import torchvision.transforms.functional as tvf
    sys.modules.setdefault('torchvision.transforms.functional_tensor', tvf)
    with warnings.catch_warnings():  # its deprecated torchvision imports warn on every start
        warnings.filterwarnings('ignore', category=UserWarning, module='torchvision')
        warnings.filterwarnings('ignore', category=DeprecationWarning)
        import languagebind
    return languagebind


def _lazy_peft():
    """A stand-in ``peft`` module whose two names import the real package when first called."""
    def real():
        if isinstance(sys.modules.get('peft'), _StandIn):
            del sys.modules['peft']
        return importlib.import_module('peft')

    stand_in = _StandIn('peft')
    stand_in.__spec__ = importlib.util.find_spec('peft')
    stand_in.LoraConfig = lambda *a, **k: real().LoraConfig(*a, **k)
    stand_in.get_peft_model = lambda *a, **k: real().get_peft_model(*a, **k)
    return stand_in


class _StandIn(types.ModuleType):
    pass


def video_modules():
    """``(configuration_video, modeling_video)`` of the ``languagebind`` package, imported without the
    package's ``__init__`` and with ``peft`` deferred (see the module docstring). A later
    ``import languagebind`` reuses these two modules."""
    names = 'languagebind.video.configuration_video', 'languagebind.video.modeling_video'
    if all(n in sys.modules for n in names):
        return tuple(sys.modules[n] for n in names)
    spec = importlib.util.find_spec('languagebind')
    if spec is None:
        raise InputError('the languagebind package is not installed (pip install -r requirements.txt)')
    bare = 'languagebind' not in sys.modules
    if bare:  # the package object without running its __init__
        sys.modules['languagebind'] = importlib.util.module_from_spec(spec)
    importlib.import_module('transformers')  # before the stand-in: it records whether peft is installed
    stand_in = 'peft' not in sys.modules
    if stand_in:
        sys.modules['peft'] = _lazy_peft()
    try:
        return tuple(importlib.import_module(n) for n in names)
    finally:
        if bare:
            del sys.modules['languagebind']
        if stand_in and isinstance(sys.modules.get('peft'), _StandIn):
            del sys.modules['peft']


def _set_attn(config):
    for c in (config.vision_config, config.text_config):  # not the top level: it rejects 'sdpa'
        c._attn_implementation = ATTN
    return config


def random_config(name):
    """A ``LanguageBindVideoConfig`` of the named random-init size (8 frames, time attention, no LoRA)."""
    config_module, _ = video_modules()
    spec = RANDOM_CONFIGS[name]
    vision = dict(spec['vision_config'], image_size=224, num_frames=8, add_time_attn=True, lora_r=0)
    return _set_attn(config_module.LanguageBindVideoConfig(projection_dim=spec['projection_dim'],
                                                text_config=_TINY_TEXT, vision_config=vision))


def load_languagebind(model_path=DEFAULT_MODEL, random_init=None):
    """The full ``LanguageBindVideo`` (on CPU, eval mode) from a local directory or a hub name, or
    randomly initialised from a fixed seed (``random_init`` in RANDOM_CONFIGS; same weights every time)."""
    config_module, model_module = video_modules()
    if random_init:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_INIT_SEED)
            return model_module.LanguageBindVideo(random_config(random_init)).eval()
    hub_name = model_path.count('/') == 1 and not model_path.startswith(('.', '~'))
    try:
        if not (os.path.isdir(model_path) or hub_name):
            raise OSError('no such folder')
        config = _set_attn(config_module.LanguageBindVideoConfig.from_pretrained(model_path))
        return model_module.LanguageBindVideo.from_pretrained(model_path, config=config).eval()
    except OSError as e:
        reason = str(e).strip().splitlines()[0][:300]
        raise InputError(
            f'could not load the LanguageBind video model {model_path!r}: {reason}\n'
            f'--model_path takes a local checkpoint folder (config.json + weights) or, where the Hugging Face\n'
            f'hub can be reached, a hub name. To get the paper\'s checkpoint, run where the hub is reachable\n'
            f'    huggingface-cli download {DEFAULT_MODEL} --local-dir checkpoints/LanguageBind_Video_Huge_V1.5_FT\n'
            f'copy the folder here and pass --model_path checkpoints/LanguageBind_Video_Huge_V1.5_FT\n'
            f'(--random_init tiny runs the pipeline with a random encoder, for testing only).') from None


class VideoEncoder(nn.Module):
    """LanguageBind's vision tower and projection only: ``[B, 3, 8, 224, 224]`` -> ``[B, D]`` unit
    vectors (the release stored them times ``logit_scale.exp()``; we store the unit vectors)."""

    def __init__(self, model):
        super().__init__()
        self.vision_model = model.vision_model
        self.visual_projection = model.visual_projection

    def forward(self, pixel_values):
        pooled = self.vision_model(pixel_values=pixel_values, return_dict=False)[1]
        return F.normalize(self.visual_projection(pooled).float(), dim=-1)


def load_encoder(model_path=DEFAULT_MODEL, random_init=None):
    """``VideoEncoder`` (CPU, eval mode); the text tower is dropped with the full model."""
    return VideoEncoder(load_languagebind(model_path, random_init)).eval()
