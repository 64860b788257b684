"""LanguageBind video encoder: loading a checkpoint into ``models_langbind.VideoEncoder``, random
encoders for tests, and the ``languagebind`` package (its processor and model, the tests' reference).

A checkpoint is a folder as the Hugging Face hub holds it: ``config.json`` and the weights
(``model.safetensors`` or ``pytorch_model.bin``, either possibly sharded with an ``.index.json``). Only
the vision tower and projection are read, by name; every one of their weights must be there with
its shape. Pickled ``.bin`` files are read with ``torch.load(weights_only=True)``: tensors only, no
code. ``transformers`` and the package are not needed to embed.

The package needs two shims with today's libraries (used by ``import_languagebind`` and
``package_model``):
- ``pytorchvideo`` (imported by ``languagebind``) needs ``torchvision.transforms.functional_tensor``,
  which torchvision removed: alias it to ``torchvision.transforms.functional``.
- With recent ``transformers`` the model's attention fails (``KeyError: None``) unless the configs'
  ``_attn_implementation`` is set before the model is built.
"""
import json
import os
import sys
import warnings
import zipfile

import torch

from models_langbind import VideoConfig, VideoEncoder, init_random
from util.errors import InputError
from util.frames import NUM_FRAMES, SIZE

DEFAULT_MODEL = 'LanguageBind/LanguageBind_Video_Huge_V1.5_FT'
RANDOM_INIT_SEED = 0

# Randomly initialised configurations (for tests, demos and timing only). 'tiny' costs little next to
# decoding; 'huge' has the size of LanguageBind_Video_Huge (ViT-H/14 vision tower with temporal
# attention, 1024-d projection) for timing.
_VIDEO = dict(image_size=SIZE, num_frames=NUM_FRAMES, add_time_attn=True, lora_r=0)
RANDOM_CONFIGS = {
    'tiny': dict(_VIDEO, projection_dim=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                 num_attention_heads=2, patch_size=56),
    'huge': dict(_VIDEO, projection_dim=1024, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                 num_attention_heads=16, patch_size=14),
}
WEIGHT_FILES = ('model.safetensors', 'model.safetensors.index.json', 'pytorch_model.bin', 'pytorch_model.bin.index.json')


def import_languagebind():
    """Import the ``languagebind`` package with the torchvision shim in place."""
    import torchvision.transforms.functional as tvf
    sys.modules.setdefault('torchvision.transforms.functional_tensor', tvf)
    with warnings.catch_warnings():  # its deprecated torchvision imports warn on every start
        warnings.filterwarnings('ignore', category=UserWarning, module='torchvision')
        warnings.filterwarnings('ignore', category=DeprecationWarning)
        import languagebind
    return languagebind


def package_model(config):
    """The package's ``LanguageBindVideo`` for a ``VideoConfig`` (its own random weights, a tiny text
    tower), eval mode, with the attention shim."""
    lb = import_languagebind()
    vision = {k: v for k, v in vars(config).items() if k != 'projection_dim'}
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=64)
    full = lb.LanguageBindVideoConfig(projection_dim=config.projection_dim, text_config=text, vision_config=vision)
    for c in (full.vision_config, full.text_config):  # not the top level: it rejects 'sdpa'
        c._attn_implementation = 'sdpa'
    return lb.LanguageBindVideo(full).eval()


def checkpoint_key(key):
    """A checkpoint's parameter name as ``VideoEncoder`` names it: ``peft``'s wrapping (``base_model.model.``,
    ``.base_layer``, the adapter name ``.default``) removed."""
    return key.replace('base_model.model.', '').replace('.base_layer.', '.').replace('.default.', '.')


def read_config(folder):
    """The ``VideoConfig`` of a checkpoint folder's ``config.json``."""
    path = os.path.join(folder, 'config.json')
    try:
        with open(path) as f:
            d = json.load(f)
        # old configs keep the vision settings under 'vision_config_dict' (it wins, as in the package)
        vision = d.get('vision_config_dict') or d.get('vision_config') or {}
        return VideoConfig.from_dict({**vision, 'projection_dim': d.get('projection_dim', 512)})
    except OSError as e:  # no config.json (a folder that is not a checkpoint), or unreadable
        raise InputError(f'{path}: cannot read the checkpoint\'s config ({e.strerror or type(e).__name__}); '
                         f'--model_path takes a folder with config.json and the weights') from None
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError, TypeError) as e:
        raise InputError(f'{path}: not a LanguageBind config ({type(e).__name__}: {e})') from None


def read_weights(folder):
    """``{name: tensor}`` of the vision tower and projection in a checkpoint folder (names as
    ``checkpoint_key`` gives them), and the file(s) read."""
    name = next((n for n in WEIGHT_FILES if os.path.isfile(os.path.join(folder, n))), None)
    if name is None:
        raise InputError(f'{folder}: no weights ({" or ".join(WEIGHT_FILES)})')
    path = os.path.join(folder, name)
    if name.endswith('.index.json'):
        try:
            with open(path) as f:
                files = sorted(set(json.load(f)['weight_map'].values()))
            if not files or not all(isinstance(n, str) for n in files):
                raise TypeError(f'weight_map should map names to file names, has {files[:3]}')
        except (OSError, json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as e:
            raise InputError(f'{path}: not a weights index ({type(e).__name__}: {e})') from None
    else:
        files = [name]
    wanted = ('vision_model.', 'visual_projection.')
    out, origin = {}, {}
    for f in files:
        path = os.path.join(folder, f)
        try:
            if f.endswith('.safetensors'):
                from safetensors import safe_open
                with safe_open(path, 'pt') as sf:
                    tensors = {k: sf.get_tensor(k) for k in sf.keys() if k.startswith(wanted)}
            else:  # tensors only: nothing in the file is executed (mmap: not for the pre-1.6 format)
                sd = torch.load(path, map_location='cpu', weights_only=True, mmap=zipfile.is_zipfile(path))
                tensors = {k: v for k, v in sd.items() if k.startswith(wanted)}
                bad = next((k for k, v in tensors.items() if not isinstance(v, torch.Tensor)), None)
                if bad:
                    raise TypeError(f'{bad} is a {type(tensors[bad]).__name__}, not a tensor')
        except Exception as e:  # noqa: BLE001 -- any unreadable file: one line naming it
            raise InputError(f'{path}: cannot read the weights ({type(e).__name__}: {str(e).splitlines()[0][:200]})') from None
        for k, v in tensors.items():  # two names for one weight (peft's and plain, or in two shards): ambiguous
            name = checkpoint_key(k)
            if name in out:
                raise InputError(f'{path}: {k} and {origin[name]} are both the weight {name}')
            out[name], origin[name] = v, f'{k} (in {f})'
    return out, files


def _resolve(model_path):
    """The local folder of ``model_path`` (a folder, or a hub name fetched where the hub is reachable)."""
    if os.path.isdir(model_path):
        return model_path
    hub_name = model_path.count('/') == 1 and not model_path.startswith(('.', '~', '/'))
    reason = 'no such folder'
    if hub_name:
        try:
            from huggingface_hub import snapshot_download
            return snapshot_download(model_path, allow_patterns=['*.json', '*.safetensors', '*.bin'])
        except Exception as e:  # noqa: BLE001 -- offline, unknown name, ...: the same advice
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
    raise InputError(
        f'could not load the LanguageBind video model {model_path!r}: {reason}\n'
        f'--model_path takes a local checkpoint folder (config.json + weights) or, where the Hugging Face\n'
        f'hub can be reached, a hub name. To get the paper\'s checkpoint, run where the hub is reachable\n'
        f'    huggingface-cli download {DEFAULT_MODEL} --local-dir checkpoints/LanguageBind_Video_Huge_V1.5_FT\n'
        f'copy the folder here and pass --model_path checkpoints/LanguageBind_Video_Huge_V1.5_FT\n'
        f'(--random_init tiny runs the pipeline with a random encoder, for testing only).')


def load_encoder(model_path=DEFAULT_MODEL, random_init=None, log=print):
    """``VideoEncoder`` (CPU, float32, eval mode) from a checkpoint folder or hub name, or randomly
    initialised (``random_init`` in RANDOM_CONFIGS; the same weights every time). Weights of the
    vision tower the encoder does not use are reported through ``log``, as the package ignores them."""
    if random_init:
        return init_random(VideoEncoder(VideoConfig(**RANDOM_CONFIGS[random_init])), RANDOM_INIT_SEED).eval()
    folder = _resolve(model_path)
    config = read_config(folder)
    needs = {'num_frames': NUM_FRAMES, 'image_size': SIZE, 'num_channels': 3}  # what step 3 gives the encoder
    reason = config.check() or next((f'{k} {getattr(config, k)!r} (step 3 gives {NUM_FRAMES} RGB frames of '
                                     f'{SIZE}x{SIZE} a segment)' for k, v in needs.items() if getattr(config, k) != v), None)
    if reason:
        raise InputError(f'{os.path.join(folder, "config.json")}: not a LanguageBind video model step 3 can '
                         f'run: {reason}')
    with torch.device('meta'):  # no random initialisation (seconds for Huge): every weight is loaded below
        model = VideoEncoder(config)
    weights, files = read_weights(folder)
    where = os.path.join(folder, files[0])
    weights.pop('vision_model.embeddings.position_ids', None)  # a buffer (0, 1, 2, ...) in older checkpoints
    expected = model.state_dict()
    missing = [k for k in expected if k not in weights]
    if missing and all('.lora_' in k for k in missing):
        raise InputError(f'{where}: config.json has lora_r {config.lora_r} but the '
                         f'checkpoint holds no LoRA weights (e.g. {missing[0]}); if they were merged into the '
                         f'weights, set lora_r to 0 in config.json')
    if missing:
        raise InputError(f'{where}: {len(missing)} weight(s) of the video encoder missing, '
                         f'e.g. {missing[0]} (is this a LanguageBind video checkpoint matching its config.json?)')
    for k, v in expected.items():
        if weights[k].shape != v.shape:
            raise InputError(f'{where}: {k} has shape {list(weights[k].shape)}, '
                             f'config.json implies {list(v.shape)}')
        if not weights[k].is_floating_point() or weights[k].is_meta:
            raise InputError(f'{where}: {k} holds {weights[k].dtype} '
                             f'{"meta " if weights[k].is_meta else ""}values, not floating-point weights')
    unused = sorted(set(weights) - set(expected))
    lora = next((k for k in unused if '.lora_' in k), None)
    if lora:  # trained LoRA weights that config.json does not switch on would be dropped
        raise InputError(f'{where}: holds LoRA weights ({lora}) but config.json has '
                         f'lora_r {config.lora_r} and the model none there')
    if unused:
        log(f'note: {folder}: {len(unused)} vision weight(s) not used by the video encoder, e.g. {unused[0]}')
    # float32 copies (a checkpoint may hold fp16 or bf16; an mmap-ed .bin's tensors are not kept)
    model.load_state_dict({k: weights[k].to(torch.float32, copy=True) for k in expected}, assign=True)
    return model.eval()
