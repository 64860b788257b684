"""Attentive / linear probing (main_probe.py, engine_probe.py) on generated embeddings with a known signal."""
import argparse
import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch

import engine_probe as ep
import main_probe as mp
from models_probe import APHead, HeadGrid
from models_lvmae import LVMAE
from util.checkpoint import save_checkpoint
from util.embeddings import EmbeddingError, embedding_path, save_video_embeddings
from util.features import Items
from util.tasks import SPLITS, Task

D = 32
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_task(root, name, splits, num_classes, regression=False, missing=()):
    """``splits``: {split: [(embeddings [L, D], label)]}; writes store files, CSVs and task.json.
    Videos of the splits in ``missing`` get CSV rows but no embedding file."""
    folder = os.path.join(root, name)
    Task(name, num_classes, regression).save(folder)
    for split, videos in splits.items():
        lines = ['video_id,embedding_path,number_of_segments,label,label_name,split']
        for i, (emb, label) in enumerate(videos):
            vid = f'{name}_{split}_{i}'
            path = embedding_path(os.path.join(root, 'embeddings'), vid)
            if split not in missing:
                n = len(emb)
                save_video_embeddings(path, emb, np.arange(n) * 5., np.arange(1, n + 1) * 5.,
                                      {'video_id': vid, 'random_init': '0'}, dtype=np.float32)
            lines.append(f'{vid},{os.path.relpath(path, folder)},{len(emb)},{label},c{label},{split}')
        with open(os.path.join(folder, f'{split}.csv'), 'w') as f:
            f.write('\n'.join(lines) + '\n')


def kinds(rng, k):
    return torch.nn.functional.normalize(torch.from_numpy(rng.standard_normal((k, D))).float(), dim=-1)


def segments(rng, proto, kinds_seq, noise=0.05):
    return proto[kinds_seq] + noise * torch.from_numpy(rng.standard_normal((len(kinds_seq), D))).float()


@pytest.fixture(scope='module', autouse=True)
def one_thread():
    """Tiny tensors: one thread avoids waiting on busy cores (restored afterwards)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    root = str(tmp_path_factory.mktemp('probe'))
    rng = np.random.default_rng(0)
    proto = kinds(rng, 2)

    def mix_video(label):  # classes differ in the fraction of kind-1 segments (0, 1/3, 2/3, 1), any order
        L = 3 * int(rng.integers(2, 5))
        return segments(rng, proto, rng.permutation(np.arange(L) < label * L // 3).astype(int)), label

    def order_video(label):  # same segments, two orders: A..AB..B or B..BA..A
        h = int(rng.integers(3, 7))
        return segments(rng, proto, np.array([label] * h + [1 - label] * h)), label

    # mix: 4 classes, val and test lack class 1: ids must be kept as given
    write_task(root, 'mix', {
        'train': [mix_video(c % 4) for c in range(120)],
        'val': [mix_video([0, 2, 3][c % 3]) for c in range(45)],
        'test': [mix_video([0, 2, 3][c % 3]) for c in range(60)]}, 4)
    write_task(root, 'order', {s: [order_video(c % 2) for c in range(n)]
                               for s, n in (('train', 128), ('val', 48), ('test', 64))}, 2)
    w = torch.from_numpy(rng.standard_normal(D)).float()

    def reg_video():
        emb = segments(rng, kinds(rng, 8), rng.integers(0, 8, int(rng.integers(4, 10))), noise=0)
        return emb, float(torch.nn.functional.normalize(emb, dim=-1).mean(0) @ w)
    write_task(root, 'reg', {s: [reg_video() for _ in range(n)] for s, n in
                             (('train', 160), ('val', 40), ('test', 40))}, 1, regression=True)
    write_task(root, 'gone', {s: [mix_video(0), mix_video(1)] for s in SPLITS}, 4, missing=('test',))
    write_task(root, 'badlabel', {s: [mix_video(0), mix_video(1), mix_video(3)] for s in SPLITS}, 3)
    write_task(root, 'holes', {s: [mix_video(0), mix_video(1)] for s in SPLITS}, 4)
    os.remove(embedding_path(os.path.join(root, 'embeddings'), 'holes_val_1'))

    # an encoder that adds positions, saved in the original release's layout (args = Namespace, names
    # of a DistributedDataParallel-wrapped model; its decoder differs from our defaults and is ignored)
    torch.manual_seed(0)
    enc = LVMAE(num_patches=16, input_size=D, depth=1, num_heads=4, decoder_embed_dim=16, decoder_depth=1,
                decoder_num_heads=2)
    ckpt = os.path.join(root, 'release.pth')
    torch.save({'model': {'module.' + k: v for k, v in enc.state_dict().items()}, 'args': argparse.Namespace(
        input_size=D, num_patches=16, depth=1, num_heads=4, decoder_embed_dim=16, decoder_depth=1,
        decoder_num_heads=2, mask_ratio=0.5)}, ckpt)
    ours = os.path.join(root, 'checkpoint-0.pth')  # our layout, no args: architecture from the shapes
    save_checkpoint(ours, {'model': enc.state_dict(), 'epoch': 0})
    return {'root': root, 'release': ckpt, 'ours': ours}


def run(data, probe, task, *flags, out='out'):
    args = mp.get_args_parser(probe).parse_args(
        ['--task', *task.split(), '--data_path', data['root'], '--output_dir', os.path.join(data['root'], out),
         '--device', 'cpu', '--epochs', '8', '--num_heads', '4', *flags])
    return mp.main(args)


def test_ap_head_equals_timm_block_at_cls():
    torch.manual_seed(0)
    head = APHead(D, 3, num_heads=8)
    for p in head.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x, lengths = torch.randn(4, 7, D), torch.tensor([7, 3, 1, 5])
    mask = (torch.arange(7)[None] < lengths[:, None])[:, None, None, :]
    torch.testing.assert_close(head.block_cls(x, lengths), head.block(x, attn_mask=mask)[:, 0], rtol=1e-5, atol=1e-5)


def test_mix_task_ap_lp_keep_class_ids(data):
    ap = run(data, 'ap', 'mix', '--resume', data['release'], '--lr', '1e-3')
    lp = run(data, 'lp', 'mix', '--baseline', 'raw', '--lr', '1e-2', '--epochs', '15')
    for res in (ap, lp):
        r = res['tasks']['mix']
        assert r['num_classes'] == 4 and r['metric'] == 'top1'
        assert r['num_videos'] == {'train': 120, 'val': 45, 'test': 60}
        assert r['test_mean'] > 70, r   # chance: 33 % over the classes present, 25 % over the head's
        assert res['classification_avg'] == r['test_mean'] and res['random_encoder'] is False


def test_order_task_needs_positions(data):
    ap = run(data, 'ap', 'order', '--resume', data['release'], '--lr', '1e-3', '--epochs', '15')['tasks']['order']
    lp_raw = run(data, 'lp', 'order', '--baseline', 'raw', '--lr', '1e-2', '--epochs', '15')['tasks']['order']
    assert ap['test_mean'] > 85, ap
    assert lp_raw['test_mean'] < 68, lp_raw


def test_regression_recovers_linear_target(data):
    res = run(data, 'lp', 'reg', '--baseline', 'raw', '--lr', '3e-2', '--epochs', '40')
    r = res['tasks']['reg']
    assert r['metric'] == 'mse' and r['num_classes'] == 1 and res['classification_avg'] is None
    var = pd.read_csv(os.path.join(data['root'], 'reg', 'test.csv'))['label'].var()
    assert r['test_mean'] < 0.05 * var, (r, var)


def test_cached_equals_uncached_and_seeds(data):
    flags = ('--resume', data['ours'], '--epochs', '3', '--seeds', '0', '1')
    cached = run(data, 'ap', 'mix', *flags, '--cache_ram_gb', '0', out='cached')['tasks']['mix']  # memory-mapped
    uncached = run(data, 'ap', 'mix', *flags, '--no_cache', out='uncached')['tasks']['mix']
    assert [r['best_epoch'] for r in cached['per_seed']] == [r['best_epoch'] for r in uncached['per_seed']]
    for a, b in zip(cached['per_seed'], uncached['per_seed']):
        assert a['val'] == pytest.approx(b['val'], abs=1e-6) and a['test'] == pytest.approx(b['test'], abs=1e-6)
    assert cached['test_std'] == pytest.approx(np.std([r['test'] for r in cached['per_seed']]))
    log = [json.loads(line) for line in open(os.path.join(data['root'], 'cached', 'log.txt'))]
    assert [(r['seed'], r['epoch']) for r in log] == [(s, e) for s in (0, 1) for e in range(3)]
    assert {'train_loss', 'val_top1', 'test_top1', 'lr'} <= set(log[-1])


def test_group_run_skips_task_without_test_embeddings(data):
    res = run(data, 'lp', 'mix gone', '--baseline', 'raw', '--epochs', '2', out='group')
    assert 'skipped' in res['tasks']['gone'] and 'test.csv' in res['tasks']['gone']['skipped']
    md = open(os.path.join(data['root'], 'group', 'results.md')).read()
    assert 'skipped*' in md and '| Avg |' in md
    saved = json.load(open(os.path.join(data['root'], 'group', 'results.json')))
    assert saved['tasks']['gone'] == res['tasks']['gone'] and saved['classification_avg'] == res['tasks']['mix']['test_mean']
    with pytest.raises(EmbeddingError, match='no test embeddings'):   # alone, it is an error
        run(data, 'lp', 'gone', '--baseline', 'raw', '--epochs', '1')


def test_bad_inputs_name_file_row_or_parameter(data):
    with pytest.raises(EmbeddingError, match=r'badlabel.train\.csv row 3 .*label 3 .*\[0, 3\)'):
        run(data, 'lp', 'badlabel', '--baseline', 'raw', '--epochs', '1')
    with pytest.raises(RuntimeError, match=r'pos_embed: checkpoint \(1, 17, 32\) vs model \(1, 9, 32\)'):
        run(data, 'ap', 'mix', '--resume', data['release'], '--num_patches', '8', '--epochs', '1')
    with pytest.raises(ValueError, match='num_heads=4'):
        run(data, 'ap', 'mix', '--resume', data['release'], '--epochs', '1', '--num_heads', '2')
    with pytest.raises(EmbeddingError, match=r'val\.csv row 2 .*holes_val_1.safetensors: embedding file not found'):
        run(data, 'lp', 'holes', '--baseline', 'raw', '--epochs', '1')


def test_long_video_windows():
    seqs = [torch.randn(5, D), torch.randn(2, D)]
    first = Items.from_videos(seqs, torch.tensor([0, 1]), 2, long_video=False)
    assert first.length.tolist() == [2, 2] and torch.equal(first.data[:2], seqs[0][:2])
    items = Items.from_videos(seqs, torch.tensor([0, 1]), 2, long_video=True)
    assert items.length.tolist() == [2, 2, 1, 2] and items.video.tolist() == [0, 0, 0, 1]
    torch.manual_seed(0)
    head = APHead(D, 3, num_heads=8, prepend_cls=True)
    out = ep.head_outputs(HeadGrid(head, 1), items, torch.tensor([1, 0]), None, 'cpu')[0]
    windows = [head(w[None], torch.tensor([len(w)])) for w in seqs[0].split(2)]
    torch.testing.assert_close(out[1], torch.cat(windows).mean(0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out[0], head(seqs[1][None], torch.tensor([2]))[0], rtol=1e-5, atol=1e-6)


def test_cli_readme_command(data, tmp_path):
    out = tmp_path / 'cli'
    subprocess.run([sys.executable, os.path.join(REPO, 'test_lp_movie_clip.py'), '--batch_size', '16', '--task', 'mix',
                    '--epochs', '2', '--lr', '3e-4', '--resume', data['ours'], '--num_heads', '4',
                    '--data_path', data['root'], '--output_dir', str(out), '--device', 'cpu'], check=True, cwd=tmp_path,
                   env={**os.environ, 'OMP_NUM_THREADS': '1'})
    res = json.load(open(out / 'results.json'))
    assert res['probe'] == 'lp' and res['baseline'] is None and res['checkpoint'] == data['ours']
    assert len(res['tasks']['mix']['per_seed']) == 1 and (out / 'results.md').exists()
    assert any(f.startswith('events') for f in os.listdir(out / 'tensorboard' / 'mix' / 'seed0'))
