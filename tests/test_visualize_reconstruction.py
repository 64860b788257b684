"""tools/visualize_reconstruction.py on a tiny untrained LV-MAE and a generated video (nothing trained)."""
import argparse
import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from models_lvmae import LVMAE
from util import misc
from util.checkpoint import save_checkpoint
from util.embeddings import save_video_embeddings
from util.errors import InputError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(REPO, 'tools', 'visualize_reconstruction.py')
D, P, N = 16, 16, 20          # embedding size, num_patches, segments in the video (longer than num_patches)
CFG = dict(num_patches=P, input_size=D, depth=1, num_heads=2, decoder_embed_dim=8, decoder_depth=1,
           decoder_num_heads=2, mlp_ratio=2.0)


def load_tool():
    spec = importlib.util.spec_from_file_location('visualize_reconstruction', TOOL)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


vr = load_tool()


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp('viz')
    torch.manual_seed(0)
    model = LVMAE(**CFG).eval()
    # the checkpoint as main_pretrain.py writes it (util.misc.save_model), args a Namespace
    args = argparse.Namespace(output_dir=str(root), mask_ratio=0.5, masking_strategy=False,
                              semantic_order='keep_changes', embed_dim=None, norm_pix_loss=False, cos_loss=False,
                              **CFG)
    opt = torch.optim.AdamW(model.parameters())
    misc.save_model(args, 3, model, opt, torch.amp.GradScaler('cuda', enabled=False))
    # a video of scenes: 4 scenes, each a few noisy copies of one direction
    rng = np.random.default_rng(0)
    scenes = rng.standard_normal((4, D))
    kinds = np.repeat(np.arange(4), 5)
    emb = scenes[kinds] + 0.3 * rng.standard_normal((N, D))
    store = root / 'vid_a.safetensors'
    save_video_embeddings(store, emb, np.arange(N) * 5., np.arange(1, N + 1) * 5.,
                          {'video_id': 'vid_a', 'random_init': '1'}, dtype=np.float32)
    x = torch.nn.functional.normalize(torch.as_tensor(emb).float(), dim=-1)[:P]
    return dict(root=root, model=model, ckpt=str(root / 'checkpoint-3.pth'), store=str(store), x=x)


def run_main(setup, out, **kw):
    argv = ['--resume', setup['ckpt'], '--embedding_path', setup['store'], '--out', str(out)]
    for k, v in kw.items():
        argv += [f'--{k}', str(v)]
    return vr.main(vr.get_args_parser().parse_args(argv))


def independent(x, masked, pred=None):
    """Copy-nearest-visible cosine and retrieval ranks computed here with numpy, from the masked list."""
    x = x.numpy().astype(np.float64)
    L = len(x)
    vis = [j for j in range(L) if j not in masked]
    cos = lambda a, b: float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))
    copy = [cos(x[i], x[min(vis, key=lambda j: (abs(j - i), j))]) for i in masked]
    out = dict(mean_cos_copy=float(np.mean(copy)))
    if pred is not None:
        p = pred.numpy().astype(np.float64)
        out['mean_cos_model'] = float(np.mean([cos(p[i], x[i]) for i in masked]))
        ranks = [sum(cos(p[i], x[j]) > cos(p[i], x[i]) for j in range(L)) for i in masked]
        out['top1_model'] = float(np.mean([r == 0 for r in ranks]))
    return out


@pytest.mark.slow
def test_cli_writes_picture_and_consistent_json(setup, tmp_path):
    out = tmp_path / 'pics' / 'recon.png'
    env = dict(os.environ, PYTHONPATH=REPO, MPLBACKEND='')
    res = subprocess.run([sys.executable, TOOL, '--resume', setup['ckpt'], '--embedding_path', setup['store'],
                          '--masking', 'random', '--seed', '3', '--out', str(out)],
                         capture_output=True, text=True, env=env, cwd=str(tmp_path))
    assert res.returncode == 0, res.stderr
    line = json.loads(res.stdout.strip().splitlines()[-1])
    with Image.open(out) as im:
        im.verify()
    with Image.open(out) as im:
        assert im.format == 'PNG' and 800 <= im.width <= 3000 and 500 <= im.height <= 2000
    # the first num_patches segments; half masked; what the candidates are is said
    assert line['segments'] == P and line['total_segments'] == N and line['masked'] == P // 2
    assert line['random_init'] is True and line['epoch'] == 3 and line['masking'] == 'random'
    assert line['candidates'] == "the video's own 16 segments"
    for k in ('mean_cos_model', 'mean_cos_copy', 'top1_model', 'top1_copy', 'mean_rank_model', 'mean_rank_copy'):
        assert np.isfinite(line[k]), k
    masked = line['masked_segments']
    assert len(masked) == P // 2 and masked == sorted(set(masked)) and max(masked) < P

    check_against_model(setup, line)


def check_against_model(setup, line):
    """The numbers, computed here from the masked list and the model itself."""
    masked = line['masked_segments']
    with torch.no_grad():
        mask = torch.zeros(1, P, dtype=torch.bool)
        mask[0, masked] = True
        _, pred, _ = setup['model'](setup['x'][None], torch.tensor([P]), mask=mask)
    ref = independent(setup['x'], masked, pred[0])
    for k, v in ref.items():
        assert line[k] == pytest.approx(v, abs=1e-5), k


def test_same_seed_same_numbers_and_picture_other_seed_other_mask(setup, tmp_path):
    a = run_main(setup, tmp_path / 'a.png', seed=5, masking='random')
    b = run_main(setup, tmp_path / 'b.png', seed=5, masking='random')
    c = run_main(setup, tmp_path / 'c.png', seed=6, masking='random')
    strip = lambda d: {k: v for k, v in d.items() if k != 'out'}
    assert strip(a) == strip(b)
    check_against_model(setup, a)
    assert (tmp_path / 'a.png').read_bytes() == (tmp_path / 'b.png').read_bytes()
    assert a['masked_segments'] != c['masked_segments']


def test_semantic_masking_masks_the_most_redundant_segments(setup, tmp_path):
    line = run_main(setup, tmp_path / 's.png', masking='semantic')
    x = setup['x'].numpy().astype(np.float64)
    prev = np.concatenate([[0.0], [x[i] @ x[i - 1] for i in range(1, P)]])
    keep = set(np.argsort(prev, kind='stable')[:P // 2].tolist())   # change points kept
    assert line['masked_segments'] == [i for i in range(P) if i not in keep]
    assert line['mean_cos_copy'] == pytest.approx(independent(setup['x'], line['masked_segments'])['mean_cos_copy'],
                                                  abs=1e-5)
    # on this video of scenes, copying a neighbour is a strong answer for redundant segments
    assert line['mean_cos_copy'] > 0.5


def test_checkpoint_without_args_uses_shapes_and_given_heads(setup, tmp_path):
    bare = tmp_path / 'bare.pth'
    save_checkpoint(bare, {'model': setup['model'].state_dict()})   # no args at all
    ref = run_main(setup, tmp_path / 'r.png', seed=1, masking='random', mask_ratio=0.5)
    argv = ['--resume', str(bare), '--embedding_path', setup['store'], '--out', str(tmp_path / 'b.png'),
            '--seed', '1', '--num_heads', '2', '--decoder_num_heads', '2']
    line = vr.main(vr.get_args_parser().parse_args(argv))
    for k in ('mean_cos_model', 'mean_cos_copy', 'top1_model', 'masked_segments'):
        assert line[k] == ref[k], k
    assert line['epoch'] is None


def test_masking_defaults_to_the_checkpoints(setup, tmp_path):
    args = argparse.Namespace(mask_ratio=0.25, masking_strategy=True, semantic_order='mask_changes', **CFG)
    ckpt = tmp_path / 'semantic.pth'
    save_checkpoint(ckpt, {'model': setup['model'].state_dict(), 'epoch': 7, 'args': args})
    line = run_main(dict(setup, ckpt=str(ckpt)), tmp_path / 's.png')
    assert (line['masking'], line['semantic_order'], line['mask_ratio']) == ('semantic', 'mask_changes', 0.25)
    assert line['masked'] == P - int(P * 0.75)
    x = setup['x'].numpy().astype(np.float64)
    prev = np.concatenate([[0.0], [x[i] @ x[i - 1] for i in range(1, P)]])
    keep = set(np.argsort(-prev, kind='stable')[:int(P * 0.75)].tolist())   # mask_changes: redundant kept
    assert line['masked_segments'] == [i for i in range(P) if i not in keep]
    # flags override the checkpoint
    line = run_main(dict(setup, ckpt=str(ckpt)), tmp_path / 'r.png', masking='random', mask_ratio=0.5)
    assert (line['masking'], line['mask_ratio'], line['masked']) == ('random', 0.5, P // 2)


def test_norm_pix_loss_checkpoint_compares_with_normalised_targets(setup, tmp_path):
    torch.manual_seed(1)
    model = LVMAE(**CFG, norm_pix_loss=True).eval()
    ckpt = tmp_path / 'npl.pth'
    save_checkpoint(ckpt, {'model': model.state_dict(), 'args': argparse.Namespace(norm_pix_loss=True, **CFG)})
    line = run_main(dict(setup, ckpt=str(ckpt)), tmp_path / 'n.png', seed=2, masking='random')
    x = setup['x']
    target = (x - x.mean(-1, keepdim=True)) / (x.var(-1, keepdim=True) + 1e-6) ** .5
    mask = torch.zeros(1, P, dtype=torch.bool)
    mask[0, line['masked_segments']] = True
    with torch.no_grad():
        _, pred, _ = model(x[None], torch.tensor([P]), mask=mask)
    ref = independent(target, line['masked_segments'], pred[0])
    for k, v in ref.items():
        assert line[k] == pytest.approx(v, abs=1e-5), k


def test_bad_inputs_are_input_errors(setup, tmp_path):
    with pytest.raises(InputError, match='checkpoint not found'):
        run_main(dict(setup, ckpt=str(tmp_path / 'nope.pth')), tmp_path / 'x.png')
    wrong = tmp_path / 'wrong.safetensors'
    save_video_embeddings(wrong, np.ones((4, D + 1)), np.arange(4.), np.arange(1, 5.))
    with pytest.raises(InputError, match='embedding size'):
        run_main(dict(setup, store=str(wrong)), tmp_path / 'x.png')
    one = tmp_path / 'one.safetensors'
    save_video_embeddings(one, np.ones((1, D)), [0.], [5.])
    with pytest.raises(InputError, match='nothing to reconstruct'):
        run_main(dict(setup, store=str(one)), tmp_path / 'x.png')
    enc_only = tmp_path / 'enc.pth'
    save_checkpoint(enc_only, {'model': {k: v for k, v in setup['model'].state_dict().items()
                                         if not k.startswith(('decoder', 'mask_token'))}})
    with pytest.raises(InputError, match='no decoder'):
        run_main(dict(setup, ckpt=str(enc_only)), tmp_path / 'x.png')
    blocker = tmp_path / 'a_file'
    blocker.write_text('')
    with pytest.raises(InputError, match='cannot create its folder'):
        run_main(setup, blocker / 'sub' / 'x.png')
