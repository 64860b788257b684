"""Pretraining: dataset rules, bad input, training, torchrun equivalence, resume, NaN stop."""
import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
import main_pretrain
import models_lvmae
import util.misc as misc
from util.checkpoint import load_checkpoint
from util.datasets import PretrainDataset, collate_pretrain
from util.embeddings import EmbeddingError, embedding_path, save_video_embeddings

D = 32
TINY = ['--input_size', str(D), '--depth', '2', '--num_heads', '2', '--decoder_embed_dim', '16',
        '--decoder_depth', '1', '--decoder_num_heads', '2', '--num_patches', '32', '--mask_ratio', '0.5',
        '--num_workers', '0', '--print_freq', '1000', '--warmup_epochs', '1', '--seed', '3']


def random_walk(n, rng, step=0.1):
    """Smooth walk on the unit sphere: neighbouring segments predict a masked one."""
    x = [rng.standard_normal(D)]
    for _ in range(n - 1):
        x.append(x[-1] / np.linalg.norm(x[-1]) + step * rng.standard_normal(D))
    x = np.stack(x)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def make_csv(folder, lengths, name='combined.csv', seed=0):
    rng = np.random.default_rng(seed)
    emb_dir = os.path.join(folder, 'emb')
    rows = []
    for i, n in enumerate(lengths):
        vid = f'{os.path.splitext(name)[0]}_{i}'
        path = embedding_path(emb_dir, vid)
        save_video_embeddings(path, random_walk(n, rng), np.arange(n) * 5.0, np.arange(1, n + 1) * 5.0,
                              dtype=np.float32)
        rows.append({'video_id': vid, 'embedding_path': os.path.relpath(path, folder), 'number_of_segments': n})
    csv = os.path.join(folder, name)
    pd.DataFrame(rows).to_csv(csv, index=False)
    return csv


def run_main(argv):
    main_pretrain.main(main_pretrain.get_args_parser().parse_args(argv))


def params(path):
    return load_checkpoint(path)['model']


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp('pretrain'))
    rng = np.random.default_rng(1)
    return {'train': make_csv(folder, rng.integers(6, 30, size=16)),
            'val': make_csv(folder, rng.integers(6, 30, size=6), name='val.csv', seed=2),
            'folder': folder}


# ---------------------------------------------------------------- dataset
def test_train_windows_are_consecutive_random_and_reproducible(tmp_path):
    csv = make_csv(str(tmp_path), [60])
    full = PretrainDataset(csv, D, 100, 0.5, train=False)[0][0]
    ds = PretrainDataset(csv, D, 16, 0.5, seed=7)
    starts, lengths = set(), set()
    for epoch in range(12):
        ds.set_epoch(epoch)
        x, noise = ds[0]
        assert 2 <= x.shape[0] <= 16 and noise.shape == (x.shape[0],)   # 10 s .. 16 segments x 5 s
        start = int(torch.cdist(x[:1], full).argmin())
        assert torch.equal(x, full[start:start + x.shape[0]])            # consecutive segments
        starts.add(start)
        lengths.add(x.shape[0])
        again = PretrainDataset(csv, D, 16, 0.5, seed=7)
        again.set_epoch(epoch)
        assert torch.equal(again[0][0], x) and torch.equal(again[0][1], noise)
    assert len(starts) > 3 and len(lengths) > 3


def test_tiling_cut_replacement_and_eval_mode(tmp_path):
    csv = make_csv(str(tmp_path), [1, 3, 40])
    val = PretrainDataset(csv, D, 8, 0.5, train=False)
    one, three = val[0][0], val[1][0]
    assert one.shape[0] == 8 and torch.equal(one, one[:1].repeat(8, 1))               # < 2 segments: 8 times
    assert three.shape[0] == 8 and torch.equal(three[:6], three[:3].repeat(2, 1))     # < 5: 3 times, then cut
    ds = PretrainDataset(csv, D, 12, 0.5)
    for epoch in range(6):
        ds.set_epoch(epoch)
        x = ds[1][0]                                   # a 2- or 3-segment window of a 3-segment video, tiled
        assert x.shape[0] in (6, 9) and torch.equal(x, x[:x.shape[0] // 3].repeat(3, 1))
        x = ds[2][0]                                   # long video: a window of 2..12 segments, never tiled
        assert 2 <= x.shape[0] <= 12 and torch.unique(x, dim=0).shape[0] == x.shape[0]
    # mask ratio 0.9: 8 tiled tokens keep int(8 * 0.1) = 0, so video 0 is replaced (deterministically)
    ds = PretrainDataset(csv, D, 12, 0.9)
    first = [ds[0][0] for _ in range(2)]
    assert int(first[0].shape[0] * 0.1) > 0 and torch.equal(first[0], first[1])
    # validation: the first num_patches segments and the same noise at every epoch
    val = PretrainDataset(csv, D, 12, 0.5, train=False)
    x0, n0 = val[2]
    val.set_epoch(5)
    x5, n5 = val[2]
    assert x0.shape[0] == 12 and torch.equal(x0, x5) and torch.equal(n0, n5)
    assert torch.equal(x0, PretrainDataset(csv, D, 40, 0.5, train=False)[2][0][:12])


def test_collate_pads_to_longest():
    a, b = torch.randn(3, 4), torch.randn(5, 4)
    x, lengths, noise = collate_pretrain([(a, torch.rand(3)), (b, torch.rand(5))])
    assert x.shape == (2, 5, 4) and lengths.tolist() == [3, 5]
    assert torch.equal(x[0, :3], a) and (x[0, 3:] == 0).all()
    assert (noise[0, 3:] == 1).all() and (noise[:, :3] < 1).all()


# ---------------------------------------------------------------- bad input
def test_bad_input_names_file_and_row(tmp_path):
    folder = str(tmp_path)
    csv = make_csv(folder, [6, 7, 8, 9])
    df = pd.read_csv(csv)
    nan_path = os.path.join(folder, df.embedding_path[1])
    save_video_embeddings(nan_path, np.full((7, D), np.nan), np.arange(7.), np.arange(1, 8.), dtype=np.float32)
    df.loc[2, 'embedding_path'] = 'emb/missing.safetensors'
    save_video_embeddings(os.path.join(folder, df.embedding_path[3]), np.ones((9, D + 1)), np.arange(9.),
                          np.arange(1, 10.))
    df.to_csv(csv, index=False)
    ds = PretrainDataset(csv, D, 32, 0.5)
    for i, words in [(1, 'non-finite'), (2, 'not found'), (3, 'does not match --input_size')]:
        with pytest.raises(EmbeddingError, match=words) as e:
            ds[i]
        assert f'{csv} row {i + 1}' in str(e.value) and df.video_id[i] in str(e.value)
    messages = []
    ds = PretrainDataset(csv, D, 32, 0.5, skip_bad=True, log=messages.append)
    assert len(ds) == 1 and ds.rows[0][1]['video_id'] == df.video_id[0]
    assert 'skipped 3 of 4' in messages[0] and 'missing.safetensors' in messages[0]

    empty, nocol = os.path.join(folder, 'empty.csv'), os.path.join(folder, 'nocol.csv')
    open(empty, 'w').close()
    pd.DataFrame({'video_id': ['a']}).to_csv(nocol, index=False)
    for path, words in [(empty, 'empty CSV'), (nocol, 'embedding_path')]:
        with pytest.raises(EmbeddingError, match=words) as e:
            PretrainDataset(path, D, 32, 0.5, skip_bad=True)
        assert path in str(e.value)


def test_world_size_must_match_launch(data):
    with pytest.raises(SystemExit, match='--world_size 8'):
        run_main(TINY + ['--data_path', data['folder'], '--world_size', '8', '--output_dir', data['folder']])


# ---------------------------------------------------------------- training
def test_loss_goes_down_and_logs(data, tmp_path):
    out = str(tmp_path)
    run_main(TINY + ['--data_path', data['folder'], '--val_data_path', data['val'], '--output_dir', out,
                     '--batch_size', '4', '--epochs', '6', '--lr', '2e-3', '--eval_every', '1', '--save_every', '6'])
    log = [json.loads(line) for line in open(os.path.join(out, 'log.txt'))]
    assert [r['epoch'] for r in log] == list(range(6))
    assert log[-1]['train_loss'] < 0.5 * log[0]['train_loss']
    assert log[-1]['val_loss'] < 0.5 * log[0]['val_loss']
    assert os.listdir(out).count('checkpoint-5.pth') == 1
    assert any(f.startswith('events.out.tfevents') for f in os.listdir(out))


def grads_and_params(path):
    """Gradient of the single step (Adam's exp_avg / (1 - beta1)) and parameters, by name."""
    ckpt = load_checkpoint(path)
    model = models_lvmae.LVMAE(num_patches=32, input_size=D, depth=2, num_heads=2, decoder_embed_dim=16,
                               decoder_depth=1, decoder_num_heads=2)
    name = {id(p): n for n, p in model.named_parameters()}
    names = [name[id(p)] for g in main_pretrain.param_groups(model, 0.05) for p in g['params']]
    grads = {n: ckpt['optimizer']['state'][i]['exp_avg'] / 0.1 for i, n in enumerate(names)}
    return grads, ckpt['model']


def test_torchrun_two_processes_match_one_process(data, tmp_path):
    common = TINY + ['--data_path', data['train'], '--epochs', '1', '--lr', '1e-3', '--warmup_epochs', '0',
                     '--max_steps_per_epoch', '1']
    one, two, other = str(tmp_path / 'one'), str(tmp_path / 'two'), str(tmp_path / 'other')
    run_main(common + ['--batch_size', '8', '--output_dir', one])
    run_main(common + ['--batch_size', '4', '--output_dir', other])     # half the batch: must differ
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    r = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2',
                        'main_pretrain.py'] + common + ['--batch_size', '4', '--output_dir', two,
                                                        '--distributed', '--world_size', '2', '--device', 'cpu'],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    (ga, pa), (gb, pb), (gc, _) = (grads_and_params(os.path.join(o, 'checkpoint-0.pth')) for o in (one, two, other))
    torch.manual_seed(3)
    init = models_lvmae.LVMAE(num_patches=32, input_size=D, depth=2, num_heads=2, decoder_embed_dim=16,
                              decoder_depth=1, decoder_num_heads=2).state_dict()
    assert max((gc[k] - ga[k]).abs().max() for k in ga) > 1e-4
    for k in ga:
        torch.testing.assert_close(gb[k], ga[k], rtol=1e-4, atol=2e-7, msg=k)
        # Adam's first step is lr * g / (|g| + eps): compare where the gradient is not numerical noise
        # (a key bias has an exactly zero gradient in theory, so its update is noise)
        clear = ga[k].abs() > 1e-5
        torch.testing.assert_close(pb[k][clear], pa[k][clear], rtol=0, atol=1e-7, msg=k)
        assert not torch.equal(pa[k][clear], init[k][clear]), k                  # it did take a step


def test_interrupted_run_resumes_to_same_parameters(data, tmp_path, monkeypatch):
    common = TINY + ['--data_path', data['train'], '--val_data_path', data['val'], '--batch_size', '4',
                     '--epochs', '4', '--lr', '1e-3', '--save_every', '1', '--eval_every', '2']
    full, cut = str(tmp_path / 'full'), str(tmp_path / 'cut')
    run_main(common + ['--output_dir', full])

    save = misc.save_model

    def crash_after_first_checkpoint(*a, **kw):
        save(*a, **kw)
        raise KeyboardInterrupt('killed')
    monkeypatch.setattr(misc, 'save_model', crash_after_first_checkpoint)
    with pytest.raises(KeyboardInterrupt):
        run_main(common + ['--output_dir', cut])
    monkeypatch.setattr(misc, 'save_model', save)
    assert sorted(os.listdir(cut)).count('checkpoint-0.pth') == 1
    run_main(common + ['--output_dir', cut])     # auto-resume from checkpoint-0.pth
    a, b = params(os.path.join(full, 'checkpoint-3.pth')), params(os.path.join(cut, 'checkpoint-3.pth'))
    for k in a:
        assert torch.equal(a[k], b[k]), k
    log_full = [json.loads(line) for line in open(os.path.join(full, 'log.txt'))]
    log_cut = [json.loads(line) for line in open(os.path.join(cut, 'log.txt'))]
    assert log_full == log_cut


def test_nan_loss_stops_with_epoch_and_step(data, tmp_path, monkeypatch):
    forward, calls = models_lvmae.LVMAE.forward, []

    def nan_on_third_call(self, *a, **kw):
        loss, pred, mask = forward(self, *a, **kw)
        calls.append(1)
        return (loss * float('nan') if len(calls) == 3 else loss), pred, mask
    monkeypatch.setattr(models_lvmae.LVMAE, 'forward', nan_on_third_call)
    with pytest.raises(FloatingPointError, match='loss is nan at epoch 1 step 0'):
        run_main(TINY + ['--data_path', data['train'], '--batch_size', '4', '--epochs', '3',
                         '--max_steps_per_epoch', '2', '--output_dir', str(tmp_path), '--save_every', '10'])


def test_encoder_width_other_than_embedding_size(data, tmp_path):
    out = str(tmp_path)
    run_main(TINY + ['--data_path', data['train'], '--output_dir', out, '--batch_size', '4', '--epochs', '1',
                     '--embed_dim', '24', '--max_steps_per_epoch', '1'])
    sd = params(os.path.join(out, 'checkpoint-0.pth'))
    assert tuple(sd['input_proj.weight'].shape) == (24, D)
    assert tuple(sd['decoder_pred.weight'].shape)[0] == D and tuple(sd['pos_embed'].shape)[-1] == 24


def test_input_scale_auto_is_saved_and_applied_by_the_probes(data, tmp_path):
    import engine_probe
    out = str(tmp_path)
    run_main(TINY + ['--data_path', data['train'], '--output_dir', out, '--batch_size', '4', '--epochs', '1',
                     '--max_steps_per_epoch', '1', '--input_scale', 'auto'])
    path = os.path.join(out, 'checkpoint-0.pth')
    assert load_checkpoint(path)['args'].input_scale == pytest.approx((D / 2) ** 0.5)
    args = engine_probe.get_args_parser('ap').parse_args(['--resume', path])
    assert engine_probe.load_encoder(args).input_scale == pytest.approx((D / 2) ** 0.5)
    with pytest.raises(SystemExit):
        main_pretrain.get_args_parser().parse_args(['--input_scale', '0'])


def test_validation_diagnostics_logged(data, tmp_path, capsys):
    out = str(tmp_path)
    run_main(TINY + ['--data_path', data['train'], '--val_data_path', data['val'], '--output_dir', out,
                     '--batch_size', '4', '--epochs', '2', '--eval_every', '1', '--max_steps_per_epoch', '2'])
    assert 'loss of predicting the mean embedding' in capsys.readouterr().out
    log = [json.loads(line) for line in open(os.path.join(out, 'log.txt'))]
    for r in log:
        assert {'val_loss', 'val_loss_mean_prediction', 'val_loss_copy_nearest', 'val_retrieval_top1',
                'val_retrieval_rank'} <= set(r)
    # the trivial answers are computed once, on the fixed validation masks
    assert log[0]['val_loss_mean_prediction'] == log[1]['val_loss_mean_prediction'] > 0
    assert log[0]['val_loss_copy_nearest'] == log[1]['val_loss_copy_nearest'] > 0
