"""Pretraining: dataset rules, bad input, training, torchrun equivalence, resume, NaN stop."""
import argparse
import errno
import importlib.util
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
import util.datasets
import util.misc as misc
from util.checkpoint import CheckpointError, load_checkpoint
from util.datasets import PretrainDataset, VideoRows, collate_built, tile_short
from util.embeddings import EmbeddingError, embedding_path, load_row, read_csv, save_video_embeddings
from util.errors import InputError
from util.fileio import FolderLock

spec = importlib.util.spec_from_file_location('bench_pretrain', os.path.join(ROOT, 'bench', 'bench_pretrain.py'))
bench_pretrain = importlib.util.module_from_spec(spec)   # its WholeFileDataset: the loader as it was
spec.loader.exec_module(bench_pretrain)

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


def test_window_lengths_as_released():
    """randint(10, num_patches * 5) // 5 segments: 2 to num_patches, 2 included."""
    ds = PretrainDataset.__new__(PretrainDataset)
    ds.train, ds.num_patches = True, 16
    rng = np.random.default_rng(0)
    n = [ds._window(1000, rng) for _ in range(3000)]
    sizes = np.array([b - a for a, b in n])
    assert sizes.min() == 2 and sizes.max() == 16
    assert abs((sizes == 2).mean() - 5 / 71) < 0.02           # 10..14 of 10..80 give 2
    assert all(0 <= a and b <= 1000 for a, b in n)


def test_tiling_cut_replacement_and_eval_mode(tmp_path):
    csv = make_csv(str(tmp_path), [1, 3, 40])
    one = torch.randn(1, D)
    assert torch.equal(tile_short(one, 1), one.repeat(8, 1))
    val = PretrainDataset(csv, D, 8, 0.5, train=False)
    three = val[1][0]
    assert three.shape[0] == 8 and torch.equal(three[:6], three[:3].repeat(2, 1))     # < 5: 3 times, then cut
    # 1 segment keeps int(1 * 0.5) = 0 tokens: replaced by another video (deterministically)
    x0 = val[0][0]
    assert x0.shape[0] == 8 and torch.equal(x0, val[0][0]) and torch.unique(x0, dim=0).shape[0] > 1
    ds = PretrainDataset(csv, D, 12, 0.5)
    for epoch in range(6):
        ds.set_epoch(epoch)
        x = ds[1][0]                                   # a 2- or 3-segment window of a 3-segment video, tiled
        assert x.shape[0] in (6, 9) and torch.equal(x, x[:x.shape[0] // 3].repeat(3, 1))
        x = ds[2][0]                                   # long video: a window of 2..12 segments, never tiled
        assert 2 <= x.shape[0] <= 12 and torch.unique(x, dim=0).shape[0] == x.shape[0]
    # validation: the first num_patches segments and the same noise at every epoch
    val = PretrainDataset(csv, D, 12, 0.5, train=False)
    x0, n0 = val[2]
    val.set_epoch(5)
    x5, n5 = val[2]
    assert x0.shape[0] == 12 and torch.equal(x0, x5) and torch.equal(n0, n5)
    assert torch.equal(x0, PretrainDataset(csv, D, 40, 0.5, train=False)[2][0][:12])


def test_video_too_short_for_a_visible_token_is_replaced_before_tiling(tmp_path):
    """At mask ratio 0.7 a 3-segment video keeps int(3 * 0.3) = 0 tokens: replaced, as released (its
    tiled window of 9 tokens would keep 2, but the release decided on the whole video)."""
    csv = make_csv(str(tmp_path), [3, 40])
    full = PretrainDataset(csv, D, 100, 0.5, train=False)[1][0]
    ds = PretrainDataset(csv, D, 12, 0.7, seed=1)
    for epoch in range(4):
        ds.set_epoch(epoch)
        x, noise = ds[0]
        start = int(torch.cdist(x[:1], full).argmin())
        assert torch.equal(x, full[start:start + x.shape[0]])        # a window of the 40-segment video
        assert torch.equal(ds[0][0], x) and noise.shape == (x.shape[0],)


@pytest.mark.parametrize('dtype', [np.float16, np.float32])
def test_window_read_equals_slicing_the_full_load(tmp_path, dtype):
    folder = str(tmp_path)
    path = embedding_path(folder, 'v')
    save_video_embeddings(path, np.random.default_rng(0).standard_normal((300, D)), np.arange(300.),
                          np.arange(1, 301.), dtype=dtype)
    row = {'video_id': 'v', 'row': 1, 'source': path}
    full = load_row(row, D)
    legacy = []
    for i in range(20):    # the original release's layout: one .pt per segment
        p = os.path.join(folder, f'seg{i}.pt')
        torch.save({'embedding': torch.from_numpy(np.random.default_rng(i).standard_normal(D)), 'start': 5 * i,
                    'end': 5 * i + 5}, p)
        legacy.append(p)
    legacy_row = {'video_id': 'w', 'row': 2, 'source': legacy}
    with VideoRows(row, D) as v, VideoRows(legacy_row, D) as w:
        assert len(v) == 300 and len(w) == 20
        for a, b in [(0, 300), (7, 19), (44, 300), (299, 300)]:
            assert torch.equal(v.read(a, b), full[a:b])
        assert torch.equal(w.read(3, 11), load_row(legacy_row, D)[3:11])


def test_bfloat16_store_from_another_tool_reads_the_same_every_way(tmp_path):
    from safetensors.torch import save_file
    path = str(tmp_path / 'v.safetensors')
    emb = torch.nn.functional.normalize(torch.randn(30, D), dim=-1).bfloat16()
    save_file({'embeddings': emb, 'starts': torch.arange(30.).double(), 'ends': torch.arange(1, 31.).double()}, path)
    row = {'video_id': 'v', 'row': 1, 'source': path}
    full = load_row(row, D)
    torch.testing.assert_close(full, torch.nn.functional.normalize(emb.float(), dim=-1), rtol=0, atol=0)
    with VideoRows(row, D) as v:
        assert torch.equal(v.read(4, 17), full[4:17])


def test_window_read_errors_name_the_row(tmp_path):
    folder = str(tmp_path)
    emb = np.random.default_rng(0).standard_normal((50, D))
    emb[30] = np.nan
    path = embedding_path(folder, 'v')
    save_video_embeddings(path, emb, np.arange(50.), np.arange(1, 51.), dtype=np.float32)
    row = {'video_id': 'v', 'row': 4, 'source': path}
    with VideoRows(row, D, 'x.csv') as v:
        assert torch.isfinite(v.read(0, 30)).all()                 # the window before the NaN is fine
        with pytest.raises(EmbeddingError, match=r'x.csv row 4 \(video v\): .*non-finite value'):
            v.read(20, 40)
    with open(path, 'r+b') as f:                                  # a file cut short by a crash
        f.truncate(os.path.getsize(path) - 100)
    with VideoRows(row, D, 'x.csv') as v, pytest.raises(EmbeddingError, match='x.csv row 4.*truncated'):
        v.read(40, 50)
    open(path, 'wb').write(b'junk')
    with pytest.raises(EmbeddingError, match='x.csv row 4.*unreadable embedding file'):
        VideoRows(row, D, 'x.csv')


def open_files():
    return len(os.listdir('/proc/self/fd'))


def store_file(header):
    """A store file's bytes with the JSON ``header`` (bytes) and 4 rows of ones (float32) as data."""
    return len(header).to_bytes(8, 'little') + header + np.ones((4, D), np.float32).tobytes()


def store_header(shape, offsets, dtype='F32'):
    return store_file(json.dumps({'embeddings': {'dtype': dtype, 'shape': shape, 'data_offsets': offsets}}).encode())


@pytest.mark.skipif(not os.path.isdir('/proc/self/fd'), reason='counts open files in /proc/self/fd')
@pytest.mark.parametrize('content', [
    store_file(b'[' * 100_000), store_header([4, D], [-10 ** 6, 4 * D * 4 - 10 ** 6]),
    store_header([2.5, D], [0, 4 * D * 4]), store_header([-2, D], [0, 4 * D * 4]),
    store_header([4, D], [0, 2 * D * 4]), store_header([4, D], [0, 4 * D * 4], 'F16')],
    ids=['header nested past the JSON parser', 'negative offset', 'fractional rows', 'negative rows',
         'offsets not matching the shape', 'offsets not matching the dtype'])
def test_bad_file_in_a_batch_is_a_one_line_error_and_leaks_no_file(tmp_path, content):
    """A bad file among good ones: the batch raises the error naming its CSV row, on one line, and every
    file the batch opened is closed again."""
    csv = make_csv(str(tmp_path), [20] * 5)
    open(os.path.join(str(tmp_path), pd.read_csv(csv).embedding_path[2]), 'wb').write(content)
    ds = PretrainDataset(csv, D, 16, 0.5, train=False)
    before = open_files()
    for _ in range(3):
        with pytest.raises(EmbeddingError, match='unreadable embedding file') as e:
            ds.__getitems__([0, 1, 2, 3, 4])
        assert str(e.value).startswith(f'{csv} row 3 (video combined_2): ') and '\n' not in str(e.value)
    assert open_files() == before


@pytest.mark.skipif(not os.path.isdir('/proc/self/fd'), reason='counts open files in /proc/self/fd')
def test_a_batch_holds_one_file_open_at_a_time(tmp_path, monkeypatch):
    """Each file is closed once its window is read: a batch far larger than the open-file limit is fine."""
    csv = make_csv(str(tmp_path), [20] * 6)
    ds = PretrainDataset(csv, D, 16, 0.5)
    before, most = open_files(), [0]
    real = os.preadv

    def counting(*a):
        most[0] = max(most[0], open_files() - before)
        return real(*a)
    monkeypatch.setattr(os, 'preadv', counting)
    x, lengths, _ = ds.__getitems__(list(range(6)) * 50)
    assert most[0] == 1 and open_files() == before and x.shape[0] == 300


def test_read_failure_names_the_row(tmp_path, monkeypatch):
    """An I/O error while reading a window's rows (a failing disk or network file system)."""
    csv = make_csv(str(tmp_path), [20])
    row = read_csv(csv)[0]

    def failing(fd, buffers, offset):
        raise OSError(errno.EIO, os.strerror(errno.EIO))
    with VideoRows(row, D, csv) as v:
        monkeypatch.setattr(os, 'preadv', failing)
        with pytest.raises(EmbeddingError, match=f'{csv} row 1 .*: .*unreadable embedding file .*Input/output error'):
            v.read(3, 9)


@pytest.mark.skipif(not os.path.isdir('/proc/self/fd'), reason='counts open files in /proc/self/fd')
def test_file_is_closed_whatever_stops_the_header_read(tmp_path, monkeypatch):
    csv = make_csv(str(tmp_path), [20])
    row = read_csv(csv)[0]

    def interrupted(fd):
        raise KeyboardInterrupt
    monkeypatch.setattr(util.datasets, 'read_store_header', interrupted)
    before = open_files()
    with pytest.raises(KeyboardInterrupt):
        VideoRows(row, D, csv)
    assert open_files() == before


@pytest.fixture(scope='module')
def mixed_csvs(tmp_path_factory):
    """Two CSVs: float16 and float32 store files of 1 to 300 segments (1 and 3: tiled), and videos in
    the original release's layout (one .pt per segment, raw float16)."""
    folder = str(tmp_path_factory.mktemp('mixed'))
    rng = np.random.default_rng(5)
    rows = []
    for i, n in enumerate([1, 3, 4, 7, 12, 40, 300, 2]):
        path = embedding_path(os.path.join(folder, 'emb'), f's{i}')
        save_video_embeddings(path, rng.standard_normal((n, D)), np.arange(n) * 5.0, np.arange(1, n + 1) * 5.0,
                              dtype=np.float16 if i % 2 else np.float32)
        rows.append({'video_id': f's{i}', 'embedding_path': path, 'number_of_segments': n})
    store = os.path.join(folder, 'store.csv')
    pd.DataFrame(rows).to_csv(store, index=False)
    rows = []
    for i, n in enumerate([3, 9, 30]):
        paths = []
        for k in range(n):
            paths.append(os.path.join(folder, 'legacy', f'l{i}', f'{k}.pt'))
            os.makedirs(os.path.dirname(paths[-1]), exist_ok=True)
            torch.save({'embedding': torch.from_numpy(rng.standard_normal(D)).half(), 'start': 5 * k,
                        'end': 5 * k + 5}, paths[-1])
        rows.append({'video_id': f'l{i}', 'segment_paths': repr(paths), 'number_of_segments': n})
    legacy = os.path.join(folder, 'legacy.csv')
    pd.DataFrame(rows).to_csv(legacy, index=False)
    return [store, legacy]


@pytest.mark.parametrize('train,num_patches,multiple', [(True, 16, 1), (True, 8, 3), (True, 64, 32),
                                                        (False, 8, 1), (False, 20, 32), (True, 5, 32)])
def test_batches_equal_per_item_samples_padded_as_before(mixed_csvs, train, num_patches, multiple):
    """A batch built in place is byte for byte the loader as it was (bench/bench_pretrain.py's
    ``WholeFileDataset``: whole video loaded, window cut, tiled, cut to num_patches, padded as the
    collate did): windows, randomness, values, padding, the rounding to ``multiple`` but not past num_patches; ``ds[i]`` is the same sample."""
    ds, old = (cls(mixed_csvs, D, num_patches, 0.5, seed=2, train=train, pad_multiple=multiple)
               for cls in (PretrainDataset, bench_pretrain.WholeFileDataset))
    for epoch in (0, 3):
        ds.set_epoch(epoch)
        old.set_epoch(epoch)
        for indices in ([0, 1, 2, 3], [4, 5, 6, 7, 8, 9, 10], [1], [6, 0, 9]):
            x, lengths, noise = ds.__getitems__(indices)
            ref = old.__getitems__(indices)
            assert x.dtype == ref[0].dtype and noise.dtype == ref[2].dtype and lengths.dtype == torch.long
            assert torch.equal(x, ref[0]) and torch.equal(lengths, ref[1]) and torch.equal(noise, ref[2])
            for i in indices:
                assert torch.equal(ds[i][0], old[i][0]) and torch.equal(ds[i][1], old[i][1])
    # the cases: video 0 (1 segment) keeps no token at mask ratio 0.5 and is replaced; videos 1 and 8
    # (3 segments, store and legacy) and 7 (2 segments) are tiled 3 times, cut to num_patches below 9
    if not train:
        assert ds[1][0].shape[0] == min(9, num_patches) and ds[7][0].shape[0] == min(6, num_patches)


def test_batch_padding_and_dataloader_workers(mixed_csvs):
    """Zeros past each length, noise 1 past each length (real noise below 1); the DataLoader (through
    ``__getitems__``) gives the same batches with 2 workers as in the main process, also on a Subset
    (validation shards)."""
    ds = PretrainDataset(mixed_csvs, D, 12, 0.5, seed=4, pad_multiple=8)
    x, lengths, noise = ds.__getitems__([4, 0, 6])
    assert x.shape[1] == (8 if int(lengths.max()) <= 8 else 12)      # a multiple of 8, but not past 12
    for i, n in enumerate(lengths.tolist()):
        assert not x[i, n:].any() and (noise[i, n:] == 1).all() and (noise[i, :n] < 1).all()
        assert torch.allclose(x[i, :n].norm(dim=-1), torch.ones(n))
    val = PretrainDataset(mixed_csvs, D, 12, 0.5, seed=4, train=False, pad_multiple=8)
    for data in (ds, torch.utils.data.Subset(val, range(1, len(val), 2))):
        batches = {}
        for workers in (0, 2):
            loader = torch.utils.data.DataLoader(data, batch_size=3, shuffle=False, num_workers=workers,
                                                 collate_fn=collate_built)
            batches[workers] = list(loader)
        assert len(batches[0]) == -(-len(data) // 3)
        for a, b in zip(batches[0], batches[2]):
            assert all(torch.equal(u, v) for u, v in zip(a, b))
        first = data.__getitems__([0, 1, 2])
        assert all(torch.equal(u, v) for u, v in zip(batches[0][0], first))


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
    with pytest.raises(InputError, match='--world_size 8'):
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


@pytest.mark.parametrize('n', [15, 16, 41, 47])
def test_processes_share_the_steps_of_one_process(n):
    """N processes with batch B take the steps of one process with batch N * B: as many, with the same
    videos (a sampler padding the epoch with repeated videos gives 47 videos 3 steps of 2 x 8, not 2 of 16)."""
    dataset = list(range(n))

    def steps(world_size, batch_size):
        per_rank = []
        for rank in range(world_size):
            args = argparse.Namespace(world_size=world_size, rank=rank, seed=3)
            sampler = main_pretrain.train_sampler(dataset, args)
            sampler.set_epoch(2)
            per_rank.append(list(torch.utils.data.BatchSampler(sampler, batch_size, drop_last=True)))
        assert len({len(s) for s in per_rank}) == 1
        return [sorted(sum((s[i] for s in per_rank), [])) for i in range(len(per_rank[0]))]
    one = steps(1, 16)
    assert len(one) == n // 16
    assert steps(2, 8) == one and steps(8, 2) == one


@pytest.mark.slow
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
    """Killed after its first checkpoint and run again (auto-resume), a run ends with the bytes of an
    uninterrupted one in the same folder: parameters, optimizer state, args (a resumed run's used to
    record the epoch it resumed at as its start_epoch) and log.txt."""
    common = TINY + ['--data_path', data['train'], '--val_data_path', data['val'], '--batch_size', '4',
                     '--epochs', '4', '--lr', '1e-3', '--save_every', '1', '--eval_every', '2']
    out, full = str(tmp_path / 'out'), str(tmp_path / 'full')
    run_main(common + ['--output_dir', out])
    os.rename(out, full)     # the same folder for both runs: the checkpoints' args name it

    save = misc.save_model

    def crash_after_first_checkpoint(*a, **kw):
        save(*a, **kw)
        raise KeyboardInterrupt('killed')
    monkeypatch.setattr(misc, 'save_model', crash_after_first_checkpoint)
    with pytest.raises(KeyboardInterrupt):
        run_main(common + ['--output_dir', out])
    monkeypatch.setattr(misc, 'save_model', save)
    assert sorted(os.listdir(out)).count('checkpoint-0.pth') == 1
    run_main(common + ['--output_dir', out])     # auto-resume from checkpoint-0.pth
    a, b = params(os.path.join(full, 'checkpoint-3.pth')), params(os.path.join(out, 'checkpoint-3.pth'))
    for k in a:
        assert torch.equal(a[k], b[k]), k
    for name in ('checkpoint-1.pth', 'checkpoint-3.pth', 'log.txt'):
        with open(os.path.join(full, name), 'rb') as f, open(os.path.join(out, name), 'rb') as g:
            assert f.read() == g.read(), name


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


# ---------------------------------------------------------------- recipe and hardening
@pytest.fixture(scope='module')
def short_run(data, tmp_path_factory):
    """One step of one epoch with the default learning rate (no --lr, no --blr)."""
    out = str(tmp_path_factory.mktemp('short'))
    run_main(TINY + ['--data_path', data['train'], '--output_dir', out, '--batch_size', '4', '--epochs', '1',
                     '--max_steps_per_epoch', '1', '--accum_iter', '2'])
    return os.path.join(out, 'checkpoint-0.pth')


def test_default_lr_is_the_released_blr(short_run):
    args = load_checkpoint(short_run)['args']        # a plain dict: loads with weights_only
    assert isinstance(args, dict) and args['blr'] == 1e-3
    assert args['lr'] == pytest.approx(1e-3 * 4 * 2 / 256, rel=1e-12)


class _WritesMarker:
    """Unpickling this runs code: it creates the file ``path``."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, 'w'))


def test_checkpoint_with_code_is_never_unpickled_without_the_flag(data, short_run, tmp_path):
    marker = str(tmp_path / 'marker')
    ckpt = load_checkpoint(short_run)
    evil = os.path.join(str(tmp_path), 'evil.pth')
    torch.save({**ckpt, 'args': _WritesMarker(marker)}, evil)
    common = TINY + ['--data_path', data['train'], '--batch_size', '4', '--epochs', '2', '--max_steps_per_epoch', '1']
    with pytest.raises(CheckpointError, match='--trust_checkpoint') as e:
        run_main(common + ['--output_dir', str(tmp_path / 'a'), '--resume', evil])
    assert 'Unsupported global' in str(e.value) and 'open' in str(e.value) and not os.path.exists(marker)
    auto = tmp_path / 'auto'
    auto.mkdir()
    os.replace(evil, auto / 'checkpoint-0.pth')                 # found by auto-resume: never trusted
    with pytest.raises(CheckpointError, match='auto-resume'):
        run_main(common + ['--output_dir', str(auto), '--trust_checkpoint'])
    assert not os.path.exists(marker)
    run_main(common + ['--output_dir', str(tmp_path / 'b'), '--resume', str(auto / 'checkpoint-0.pth'),
                       '--trust_checkpoint'])                   # the user's explicit choice
    assert os.path.exists(marker) and os.path.exists(tmp_path / 'b' / 'checkpoint-1.pth')


def test_resume_with_other_heads_is_an_error(data, short_run, tmp_path):
    with pytest.raises(CheckpointError, match=r'--num_heads 4 \(checkpoint: 2\)'):
        run_main(TINY + ['--data_path', data['train'], '--output_dir', str(tmp_path), '--resume', short_run,
                         '--epochs', '2', '--num_heads', '4'])


def test_second_run_on_a_locked_folder_stops(data, tmp_path):
    with FolderLock(str(tmp_path), 'pretraining run'):
        with pytest.raises(InputError, match='another pretraining run is using this output folder'):
            run_main(TINY + ['--data_path', data['train'], '--output_dir', str(tmp_path)])
    assert not any(f.startswith('checkpoint') for f in os.listdir(tmp_path))


def test_output_folder_that_cannot_be_made(data, tmp_path):
    (tmp_path / 'file').write_text('')
    with pytest.raises(InputError, match='cannot create or write the output folder'):
        run_main(TINY + ['--data_path', data['train'], '--output_dir', str(tmp_path / 'file' / 'out')])


@pytest.mark.parametrize('flags, words', [
    (['--mask_ratio', '0'], '--mask_ratio: must be between 0 and 1'),
    (['--mask_ratio', '-0.2'], '--mask_ratio: must be between 0 and 1'),
    (['--mask_ratio', '1'], '--mask_ratio: must be between 0 and 1'),
    (['--batch_size', '0'], '--batch_size: must be at least 1'),
    (['--epochs', '0'], '--epochs: must be at least 1'),
    (['--num_patches', '0'], '--num_patches: must be at least 2'),
    (['--num_patches', '1'], '--num_patches: must be at least 2'),
    (['--accum_iter', '0'], '--accum_iter: must be at least 1'),
    (['--save_every', '0'], '--save_every: must be at least 1'),
    (['--eval_every', '0'], '--eval_every: must be at least 1'),
    (['--print_freq', '0'], '--print_freq: must be at least 1'),
    (['--num_heads', '3'], '--num_heads: must divide the encoder width 32'),
    (['--decoder_num_heads', '3'], '--decoder_num_heads: must divide --decoder_embed_dim 16'),
    (['--warmup_epochs', '-1'], '--warmup_epochs: must not be negative'),
    (['--lr', '0'], '--lr: must be positive'),
])
def test_flags_are_checked_at_start(data, tmp_path, flags, words):
    with pytest.raises(InputError, match='argument ' + words):
        run_main(TINY + ['--data_path', data['train'], '--output_dir', str(tmp_path)] + flags)
    assert os.listdir(tmp_path) == []        # nothing written


def test_resume_keeps_earlier_log_lines_and_sweeps_stale_temporary_files(data, tmp_path):
    out = str(tmp_path)
    common = TINY + ['--data_path', data['train'], '--batch_size', '4', '--max_steps_per_epoch', '1',
                     '--output_dir', out, '--save_every', '2']
    run_main(common + ['--epochs', '3'])           # checkpoints 1 and 2 (the last), log 0 1 2
    os.remove(os.path.join(out, 'checkpoint-2.pth'))   # as if killed after logging epoch 2
    with open(os.path.join(out, 'log.txt'), 'a') as f:
        f.write('{"train_loss": 0.1, "ep')                          # a line cut by the kill
    stale = [os.path.join(out, n) for n in ('.checkpoint-2.pth.abc123.tmp', '.log.txt.x1y2.tmp')]
    for p in stale + [os.path.join(out, '.other.tmp')]:
        open(p, 'w').close()
    run_main(common + ['--epochs', '4'])           # resumes at epoch 2
    epochs = [json.loads(line)['epoch'] for line in open(os.path.join(out, 'log.txt'))]
    assert epochs == [0, 1, 2, 3]
    assert not any(os.path.exists(p) for p in stale) and os.path.exists(os.path.join(out, '.other.tmp'))


@pytest.mark.slow
def test_command_line_errors_are_one_line(data, tmp_path):
    """A bad CSV row read inside a DataLoader worker, and a bad flag: ``error: ...``, exit 2, no traceback."""
    folder = str(tmp_path)
    csv = make_csv(folder, [6, 7, 8, 9])
    df = pd.read_csv(csv)
    df.loc[2, 'embedding_path'] = 'emb/missing.safetensors'
    df.to_csv(csv, index=False)
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    base = [sys.executable, 'main_pretrain.py'] + TINY + ['--data_path', csv, '--device', 'cpu']
    for extra, words in [(['--num_workers', '1', '--batch_size', '4', '--output_dir', str(tmp_path / 'a')],
                          f'error: {csv} row 3 (video combined_2): '),
                         (['--batch_size', '0', '--output_dir', str(tmp_path / 'b')],
                          'error: argument --batch_size: must be at least 1, got 0')]:
        r = subprocess.run(base + extra, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
        assert r.returncode == 2, r.stderr[-2000:]
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(words) and 'Traceback' not in r.stderr, r.stderr[-2000:]


def test_input_scale_auto_is_saved_and_applied_by_the_probes(data, tmp_path):
    import main_probe
    out = str(tmp_path)
    run_main(TINY + ['--data_path', data['train'], '--output_dir', out, '--batch_size', '4', '--epochs', '1',
                     '--max_steps_per_epoch', '1', '--input_scale', 'auto'])
    path = os.path.join(out, 'checkpoint-0.pth')
    assert load_checkpoint(path)['args']['input_scale'] == pytest.approx((D / 2) ** 0.5)
    args = main_probe.get_args_parser('ap').parse_args(['--resume', path, '--device', 'cpu'])
    assert main_probe.EncoderSpec(args).model.input_scale == pytest.approx((D / 2) ** 0.5)
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


def test_trivial_answers_are_scored_in_the_space_the_model_predicts(data):
    """With --norm_pix_loss the model predicts per-token normalised embeddings: the trivial answers
    (mean, copy of the nearest visible segment) are those of the normalised embeddings, not of the raw
    ones, whose losses are far higher (0.72 against 0.33 for copying, on other generated data)."""
    from engine_pretrain import trivial_losses
    from util.reconstruction import copy_nearest_visible
    loader = torch.utils.data.DataLoader(PretrainDataset(data['val'], D, 32, 0.5, train=False), batch_size=4,
                                         collate_fn=collate_built)
    args = argparse.Namespace(mask_ratio=0.5, masking_strategy=False, semantic_order='keep_changes')
    model = models_lvmae.LVMAE(num_patches=32, input_size=D, depth=1, num_heads=2, decoder_embed_dim=16,
                               decoder_depth=1, decoder_num_heads=2, norm_pix_loss=True)
    batches = []
    for x, lengths, noise in loader:
        valid = model.valid_mask(lengths, x.shape[1])
        target = (x - x.mean(-1, keepdim=True)) / (x.var(-1, keepdim=True) + 1e-6) ** 0.5
        batches.append((x, target, model.make_mask(x, lengths, 0.5, noise=noise) & valid, valid))
    mean = torch.cat([t[v] for _, t, _, v in batches]).mean(0)
    expected = {}
    for name, predict in (('mean', lambda t, m, v: mean.expand_as(t)), ('copy', copy_nearest_visible)):
        sums = [model.forward_loss(x, predict(t, m, v), m, reduction='sum') for x, t, m, v in batches]
        expected[name] = (sum(s for s, _ in sums) / sum(n for _, n in sums)).item()
    got = trivial_losses(model, loader, 'cpu', args)
    assert got == pytest.approx(expected, rel=1e-5)
