"""Attentive / linear probing (main_probe.py, engine_probe.py) on generated embeddings with a known signal."""
import argparse
import json
import os
import platform
import re
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

import engine_probe as ep
import main_probe as mp
from models_probe import APHead, LPHead, per_copy_parameters
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


pytestmark = pytest.mark.usefixtures('one_thread')


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
    # as step 4 writes it when no test video has embeddings: test.csv holds the header alone
    write_task(root, 'none', {'train': [mix_video(0), mix_video(1)], 'val': [mix_video(0)], 'test': []}, 4)

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


def timm_reference(head, g):
    """Copy ``g`` of an ``APHead`` as the timm modules it stands for: ``x -> head(norm(block(x)[:, 0]))``,
    with the released probe's norms (``norm_layer=nn.LayerNorm`` and ``nn.LayerNorm(dim)``: eps 1e-5)."""
    from timm.models.vision_transformer import Block
    block = Block(D, head.num_heads, qkv_bias=True, norm_layer=torch.nn.LayerNorm)
    norm, lin = torch.nn.LayerNorm(D), torch.nn.Linear(D, head.p['head_bias'].shape[1])
    params = {k: v[g] for k, v in head.p.items()}
    for kind in ('weight', 'bias'):
        params[f'attn_qkv_{kind}'] = torch.cat([params.pop(f'attn_{part}_{kind}') for part in 'qkv'])
    for prefix, m in (('', block), ('norm_', norm), ('head_', lin)):
        m.load_state_dict({n: params[prefix + n.replace('.', '_')] for n, _ in m.named_parameters()})

    def forward(x, lengths):
        if head.prepend_cls:
            x, lengths = torch.cat([head.p['cls_token'][g].expand(len(x), 1, -1), x], 1), lengths + 1
        mask = (torch.arange(x.shape[1])[None] < lengths[:, None])[:, None, None, :]
        return lin(norm(block(x, attn_mask=mask)[:, 0]))
    forward.params = params
    return forward


@pytest.mark.parametrize('prepend_cls', [False, True])
def test_ap_head_copies_equal_timm_block_at_cls(prepend_cls):
    torch.manual_seed(0)
    head = APHead(D, 3, num_heads=8, prepend_cls=prepend_cls, copies=3)
    for p in head.parameters():
        torch.nn.init.normal_(p, std=0.3)   # each copy its own weights
    x, lengths = torch.randn(4, 7, D), torch.tensor([7, 3, 1, 5])
    out = head(x, lengths)
    assert out.shape == (3, 4, 3)
    for g in range(3):
        torch.testing.assert_close(out[g], timm_reference(head, g)(x, lengths), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('prepend_cls', [False, True])
def test_ap_head_norms_have_the_released_eps(prepend_cls):
    """The released AP builds its block with ``norm_layer=nn.LayerNorm`` and its last norm as
    ``nn.LayerNorm(dim)``: PyTorch's eps 1e-5, not the encoder's 1e-6. It shows on inputs of small
    variance, such as the raw unit-norm embeddings of ``--baseline raw`` (per-element variance 1 / D)."""
    torch.manual_seed(0)
    head = APHead(D, 3, num_heads=8, prepend_cls=prepend_cls)
    x, lengths = F.normalize(torch.randn(4, 7, D), dim=-1) * 0.1, torch.tensor([7, 3, 1, 5])
    torch.testing.assert_close(head(x, lengths)[0], timm_reference(head, 0)(x, lengths), rtol=1e-5, atol=1e-6)


def test_ap_head_starts_as_the_timm_modules_it_stands_for():
    """Every copy starts from the weights the timm modules (block, norm, classifier, then the CLS token)
    get from the same seed: the released probe's initialisation."""
    from timm.models.vision_transformer import Block
    torch.manual_seed(0)
    head = APHead(D, 3, num_heads=8, prepend_cls=True, copies=2)
    torch.manual_seed(0)
    block = Block(D, 8, qkv_bias=True, norm_layer=torch.nn.LayerNorm)
    norm, lin = torch.nn.LayerNorm(D), torch.nn.Linear(D, 3)
    cls = torch.nn.init.normal_(torch.zeros(1, D), std=.02)
    for g in range(2):
        ref = timm_reference(head, g)   # the copy's weights, put back into timm's layout
        assert torch.equal(head.p['cls_token'][g], cls[0])
        for name, p in [*block.named_parameters(), *(('norm.' + n, p) for n, p in norm.named_parameters()),
                        *(('head.' + n, p) for n, p in lin.named_parameters())]:
            assert torch.equal(ref.params[name.replace('.', '_')], p), name


def test_copies_start_equal_and_train_apart_as_single_heads():
    """Each copy, trained with its own lr and weight decay in one optimiser, follows the same steps as a
    one-copy head trained alone with those hyperparameters."""
    x, lengths, y = torch.randn(6, 5, D), torch.tensor([5, 4, 3, 5, 2, 1]), torch.tensor([0, 1, 2, 0, 1, 2])
    combos = [(1e-2, 0.), (1e-3, 1e-2), (3e-2, 1e-1)]

    def train(make, hyper):
        torch.manual_seed(0)
        head = make(len(hyper))
        opt = torch.optim.Adam([{'params': v, 'lr': lr, 'weight_decay': wd}
                                for v, (lr, wd) in zip(per_copy_parameters(head), hyper)], amsgrad=True)
        for _ in range(4):
            loss = F.cross_entropy(head(x, lengths).transpose(1, 2), y.expand(len(hyper), -1), reduction='none')
            opt.zero_grad()
            loss.mean(1).sum().backward()
            opt.step()
        return head

    for make in (lambda n: APHead(D, 3, num_heads=4, copies=n), lambda n: LPHead(D, 3, copies=n)):
        torch.manual_seed(0)
        first = make(3)
        assert all(torch.equal(p[0], p[g]) for p in first.parameters() for g in range(3))
        grid = train(make, combos)
        for g, combo in enumerate(combos):
            one = train(make, [combo])
            for name, p in one.p.items():
                torch.testing.assert_close(grid.p[name][g], p[0], rtol=1e-4, atol=2e-5)
        assert not torch.allclose(grid.p['head_weight'][0], grid.p['head_weight'][1])
        assert all(p.grad is None for p in grid.parameters())   # handed over to the copies


def test_copies_gradients_accumulate_over_backward_passes():
    """As ``.grad`` does: two backward passes before a step (gradient accumulation) add up, here to the
    gradient of the whole batch; the optimiser's ``zero_grad`` clears them."""
    torch.manual_seed(0)
    x, lengths, y = torch.randn(4, 5, D), torch.tensor([5, 2, 1, 4]), torch.tensor([0, 1, 2, 0])
    for head in (APHead(D, 3, num_heads=4, copies=2), LPHead(D, 3, copies=2)):
        views = per_copy_parameters(head)
        opt = torch.optim.Adam([{'params': v} for v in views])

        def loss(b):
            out = head(x[b], lengths[b]).transpose(1, 2)
            return F.cross_entropy(out, y[b].expand(2, -1), reduction='none').sum(1).sum() / len(x)

        loss(slice(None)).backward()
        whole = [[v.grad.clone() if v.grad is not None else None for v in vs] for vs in views]
        opt.zero_grad()
        assert all(v.grad is None for vs in views for v in vs)
        loss(slice(0, 2)).backward()
        loss(slice(2, 4)).backward()
        for vs, ws in zip(views, whole):
            for v, w in zip(vs, ws):
                assert (v.grad is None) == (w is None)
                if w is not None:
                    torch.testing.assert_close(v.grad, w, rtol=1e-5, atol=1e-6)

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
    res = run(data, 'lp', 'mix gone none', '--baseline', 'raw', '--epochs', '2', out='group')
    assert 'skipped' in res['tasks']['gone'] and 'test.csv' in res['tasks']['gone']['skipped']
    assert 'skipped' in res['tasks']['none']   # step 4 writes a header alone when no test video has embeddings
    md = open(os.path.join(data['root'], 'group', 'results.md')).read()
    assert 'skipped*' in md and '| Avg |' in md
    saved = json.load(open(os.path.join(data['root'], 'group', 'results.json')))
    assert saved['tasks']['gone'] == res['tasks']['gone'] and saved['classification_avg'] == res['tasks']['mix']['test_mean']
    for task in ('gone', 'none'):   # alone, it is an error
        with pytest.raises(EmbeddingError, match='no test embeddings'):
            run(data, 'lp', task, '--baseline', 'raw', '--epochs', '1')


def test_group_run_without_any_test_embeddings_is_an_error(data):
    """A group none of whose tasks has test embeddings (a wrong --data_path) stops with status 2 before
    writing anything, instead of a table of skipped tasks and exit status 0 over an earlier run's results."""
    out = os.path.join(data['root'], 'all_skipped')
    with pytest.raises(EmbeddingError, match='no task of gone, none has test embeddings'):
        run(data, 'lp', 'gone none', '--baseline', 'raw', '--epochs', '1', out='all_skipped')
    assert not os.path.exists(os.path.join(out, 'results.json'))


def test_unknown_task_is_an_input_error_before_any_task_runs(data):
    """A task name that is neither built in nor a folder with a task.json is bad input (status 2, one
    line), found before the other tasks run; it was a ValueError traceback after them."""
    from util.errors import InputError
    out = os.path.join(data['root'], 'unknown_task')
    with pytest.raises(InputError, match="argument --task: unknown task 'nosuch'"):
        run(data, 'lp', 'mix nosuch', '--baseline', 'raw', '--epochs', '1', out='unknown_task')
    assert not os.path.exists(os.path.join(out, 'results.json'))


@pytest.mark.parametrize('content, reason', [('{"name": "x", "num', 'JSONDecodeError'),
                                             ('{"name": "x"}', "KeyError: 'num_classes'"),
                                             ('{"name": "x", "num_classes": [3]}', 'TypeError'),
                                             ('[1, 2]', 'TypeError')])
def test_task_json_that_is_not_a_task_names_its_file(tmp_path, content, reason):
    """A task.json edited by hand or cut short: one line naming the file (a KeyError or TypeError
    used to be a traceback, a JSON error a message without the file)."""
    from util.tasks import get_task
    (tmp_path / 'mine').mkdir()
    (tmp_path / 'mine' / 'task.json').write_text(content)
    with pytest.raises(ValueError, match=re.escape(f'{tmp_path / "mine" / "task.json"}: not a task definition')
                       + '.*' + re.escape(reason)):
        get_task('mine', str(tmp_path))


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
    out = ep.head_outputs(head, items, torch.tensor([1, 0]), None, 'cpu')[0]
    windows = [head(w[None], torch.tensor([len(w)]))[0] for w in seqs[0].split(2)]
    torch.testing.assert_close(out[1], torch.cat(windows).mean(0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out[0], head(seqs[1][None], torch.tensor([2]))[0, 0], rtol=1e-5, atol=1e-6)


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


# ---------------------------------------------------------------------------------------- architecture
def test_resolve_arch_order_flags_args_shapes_paper():
    from models_lvmae import PAPER_CONFIG
    from util.checkpoint import resolve_arch
    sd = LVMAE(num_patches=16, input_size=D, depth=2, num_heads=4, decoder_embed_dim=16, decoder_depth=1,
               decoder_num_heads=2).state_dict()
    arch, notes = resolve_arch({}, sd, {})      # shapes only: heads unknown -> the paper's, and said so
    assert (arch['num_patches'], arch['input_size'], arch['depth'], arch['mlp_ratio']) == (16, D, 2, 4.0)
    assert arch['num_heads'] == PAPER_CONFIG['num_heads'] and notes == ['num_heads', 'decoder_num_heads']
    arch, notes = resolve_arch({'num_heads': 4, 'depth': 2, 'cos_loss': True}, sd, {'num_patches': 8})
    assert arch['num_heads'] == 4 and arch['num_patches'] == 8 and notes == ['decoder_num_heads']
    assert arch['cos_loss'] is True    # any LVMAE keyword stored in the args is carried (e.g. an input scale)
    with pytest.raises(ValueError, match='num_heads=4'):
        resolve_arch({'num_heads': 4}, sd, {'num_heads': 2})
    assert resolve_arch({}, {}, {})[0] == {k: v for k, v in PAPER_CONFIG.items()}


def test_random_init_baseline_same_architecture_fresh_weights(data):
    args = mp.get_args_parser('ap').parse_args(['--resume', data['release'], '--baseline', 'random_init',
                                                '--device', 'cpu'])
    spec = mp.EncoderSpec(args)
    trained = torch.load(data['release'], weights_only=False)['model']
    a, b, c = spec.encoder(0).state_dict(), spec.encoder(0).state_dict(), spec.encoder(1).state_dict()
    encoder = {k[len('module.'):]: v.shape for k, v in trained.items() if not k.startswith('module.decoder_blocks')}
    assert {k: v.shape for k, v in a.items()} == encoder   # the checkpoint's encoder (no decoder blocks)
    assert all(torch.equal(a[k], b[k]) for k in a)                       # from the seed: reproducible
    assert not torch.equal(a['blocks.0.attn.qkv.weight'], c['blocks.0.attn.qkv.weight'])   # per seed
    # (the fixture's checkpoint was itself initialised from seed 0: seed 1 shows nothing is loaded)
    assert not torch.equal(c['blocks.0.attn.qkv.weight'], trained['module.blocks.0.attn.qkv.weight'])
    res = run(data, 'ap', 'order', '--resume', data['release'], '--baseline', 'random_init', '--epochs', '2',
              '--seeds', '0', '1', out='random_init')
    assert res['baseline'] == 'random_init' and len(res['tasks']['order']['per_seed']) == 2
    md = open(os.path.join(data['root'], 'random_init', 'results.md')).read()
    assert 'RANDOM INIT (no pretraining)' in md and 'release.pth' in md


# ---------------------------------------------------------------------------------------- recipe
def test_lr_follows_cosine_per_epoch_and_protocol_recorded(data):
    res = run(data, 'lp', 'mix', '--baseline', 'raw', '--lr', '1e-2', '--epochs', '4', out='cosine')
    log = [json.loads(line) for line in open(os.path.join(data['root'], 'cosine', 'log.txt'))]
    assert [r['lr'] for r in log] == pytest.approx([1e-2 * (1 + np.cos(np.pi * e / 4)) / 2 for e in range(4)])
    p = res['protocol']
    assert (p['optimizer'], p['amsgrad'], p['lr'], p['weight_decay'], p['drop_last']) == ('Adam', True, 1e-2, 1e-3, True)
    assert p['schedule'].startswith('CosineAnnealingLR(T_max=4)') and 'later epoch' in p['selection']
    assert json.load(open(os.path.join(data['root'], 'cosine', 'results.json')))['protocol'] == p


def test_protocol_names_checkpoint_sha256_and_fp32_features(data):
    import hashlib
    res = run(data, 'lp', 'mix', '--resume', data['ours'], '--epochs', '1', out='proto')
    p = res['protocol']
    assert p['checkpoint'] == 'checkpoint-0.pth' and p['feature_dtype'] == 'fp32'
    assert p['checkpoint_sha256'] == hashlib.sha256(open(data['ours'], 'rb').read()).hexdigest()


def test_tied_val_scores_select_the_later_epoch(data):
    # a learning rate of 1e-12 never changes a prediction: every epoch has the same val score
    r = run(data, 'lp', 'mix', '--baseline', 'raw', '--lr', '1e-12', '--epochs', '5', out='ties')['tasks']['mix']
    log = [json.loads(line) for line in open(os.path.join(data['root'], 'ties', 'log.txt'))]
    assert len({e['val_top1'] for e in log}) == 1
    assert r['per_seed'][0]['best_epoch'] == 4


class _CountingItems(Items):
    def batch(self, videos, device):
        self.sizes.append(len(videos))
        return super().batch(videos, device)


@pytest.mark.parametrize('keep', [False, True])
def test_train_loader_drops_the_partial_batch(keep):
    torch.manual_seed(0)
    seqs, labels = [torch.randn(3, D) for _ in range(20)], torch.arange(20) % 2
    split = lambda: _CountingItems.from_videos(seqs, labels, 16, False)
    data = {s: split() for s in SPLITS}
    for it in data.values():
        it.sizes = []
    flags = ['--baseline', 'raw', '--epochs', '2', '--batch_size', '8', '--device', 'cpu'] + (['--keep_last_batch'] * keep)
    ep.train_seed(mp.get_args_parser('lp').parse_args(flags), Task('t', 2), data, D, None, seed=0)
    assert data['train'].sizes == ([8, 8, 4] if keep else [8, 8]) * 2


def test_features_fp32_by_default():
    from util.features import Featurizer
    torch.manual_seed(0)
    enc = LVMAE(num_patches=8, input_size=D, depth=1, num_heads=4, decoder_depth=0).eval()
    x, lengths = torch.nn.functional.normalize(torch.randn(2, 5, D), dim=-1), torch.tensor([5, 3])
    assert mp.get_args_parser('ap').parse_args([]).feature_dtype == 'fp32'
    out, _ = Featurizer(enc, pooled=False)(x, lengths)
    assert out.dtype == torch.float32 and torch.equal(out, enc.forward_features(x, lengths))
    low, _ = Featurizer(enc, pooled=False, dtype='bf16')(x, lengths)
    assert not torch.equal(low, out) and torch.allclose(low, out, atol=0.1)


# ---------------------------------------------------------------------------------------- hardening
def test_second_run_on_a_locked_folder_stops(data):
    from util.errors import InputError
    from util.fileio import FolderLock
    with FolderLock(os.path.join(data['root'], 'locked'), 'probe run'):
        with pytest.raises(InputError, match='another probe run is using this output folder'):
            run(data, 'lp', 'mix', '--baseline', 'raw', '--epochs', '1', out='locked')
    run(data, 'lp', 'mix', '--baseline', 'raw', '--epochs', '1', out='locked')   # released: free again


def test_memory_mapped_cache_has_a_per_run_name(data, capsys):
    run(data, 'ap', 'mix', '--resume', data['ours'], '--epochs', '1', '--cache_ram_gb', '0', out='mmap')
    out = capsys.readouterr().out
    assert f'feature_cache_{os.getpid()}_' in out
    assert not [f for f in os.listdir(os.path.join(data['root'], 'mmap')) if f.startswith('feature_cache')]


@pytest.fixture(scope='module')
def nan_checkpoint(data):
    torch.manual_seed(0)
    enc = LVMAE(num_patches=16, input_size=D, depth=1, num_heads=4, decoder_embed_dim=16, decoder_depth=1,
                decoder_num_heads=2)
    sd = enc.state_dict()
    sd['blocks.0.mlp.fc2.bias'][0] = float('nan')
    path = os.path.join(data['root'], 'nan.pth')
    save_checkpoint(path, {'model': sd, 'args': {'num_heads': 4}})
    return path


def test_nan_checkpoint_stops_at_feature_check(data, nan_checkpoint):
    from util.features import NonFiniteError
    with pytest.raises(NonFiniteError, match=r'task mix, train split: features .* not finite'):
        run(data, 'ap', 'mix', '--resume', nan_checkpoint, '--epochs', '1', out='nan')


def test_nan_checkpoint_uncached_stops_naming_task_seed_epoch(data, nan_checkpoint):
    from util.features import NonFiniteError
    with pytest.raises(NonFiniteError, match=r'task mix, seed 3, epoch 0: training loss is nan'):
        run(data, 'lp', 'mix', '--resume', nan_checkpoint, '--epochs', '1', '--no_cache', '--seeds', '3', out='nan2')


def test_huge_regression_labels_stop(data, tmp_path):
    from util.features import NonFiniteError
    rng = np.random.default_rng(1)
    vids = lambda y: [(segments(rng, kinds(rng, 2), [0, 1, 0]), y) for _ in range(4)]
    write_task(str(tmp_path), 'huge', {'train': vids(1e30), 'val': vids(0.), 'test': vids(0.)}, 1, regression=True)
    write_task(str(tmp_path), 'big', {'train': vids(1.5e19), 'val': vids(0.), 'test': vids(0.)}, 1, regression=True)
    args = lambda t: mp.get_args_parser('lp').parse_args(
        ['--task', t, '--data_path', str(tmp_path), '--baseline', 'raw', '--epochs', '2', '--batch_size', '2',
         '--device', 'cpu', '--output_dir', str(tmp_path / t)])
    with pytest.raises(NonFiniteError, match=r'huge.train\.csv row 1 .*label 1e\+30'):
        mp.main(args('huge'))
    with pytest.raises(NonFiniteError, match=r'task big, seed 0, epoch 0: training loss is inf'):
        mp.main(args('big'))


@pytest.mark.parametrize('flag,value', [('batch_size', '0'), ('epochs', '0'), ('lr', '-1'), ('weight_decay', '-1'),
                                        ('feature_batch_size', '0'), ('lr_decay', '1.5'), ('lr', '1e-3 1e-3'),
                                        ('seeds', '0 1 0')])   # a repeated seed would count twice in mean and std
def test_bad_flags_are_argparse_style_errors(data, flag, value):
    from util.errors import InputError
    with pytest.raises(InputError, match=f'argument --{flag}: '):
        run(data, 'lp', 'mix', '--baseline', 'raw', f'--{flag}', *value.split(), out='flags')


class _Opaque:   # an object that weights-only loading refuses
    pass


def test_checkpoint_with_python_objects_needs_trust(data):
    from util.errors import InputError
    enc = LVMAE(num_patches=16, input_size=D, depth=1, num_heads=4, decoder_embed_dim=16, decoder_depth=1,
                decoder_num_heads=2)
    path = os.path.join(data['root'], 'opaque.pth')
    torch.save({'model': enc.state_dict(), 'args': argparse.Namespace(num_heads=4, extra=_Opaque())}, path)
    with pytest.raises(InputError, match='--trust_checkpoint'):
        run(data, 'lp', 'mix', '--resume', path, '--epochs', '1', out='trust')
    res = run(data, 'lp', 'mix', '--resume', path, '--epochs', '1', '--trust_checkpoint', out='trust')
    assert res['tasks']['mix']['num_videos']['train'] == 120


@pytest.mark.slow
def test_cli_bad_csv_row_is_one_line_without_traceback(data, tmp_path):
    r = subprocess.run([sys.executable, os.path.join(REPO, 'test_lp_movie_clip.py'), '--task', 'badlabel',
                        '--baseline', 'raw', '--data_path', data['root'], '--output_dir', str(tmp_path / 'o'),
                        '--device', 'cpu'], capture_output=True, text=True, cwd=tmp_path,
                       env={**os.environ, 'OMP_NUM_THREADS': '1'})
    assert r.returncode == 2 and 'Traceback' not in r.stderr
    assert r.stderr.startswith('error: ') and 'train.csv row 3' in r.stderr


# ---------------------------------------------------------------------------------------- sweeps
def test_sweep_heads_equal_single_runs_and_select_on_val(data):
    flags = ('--resume', data['ours'], '--epochs', '3', '--seeds', '0', '1')
    grid = run(data, 'ap', 'mix', *flags, '--lr', '1e-3', '3e-5', '--weight_decay', '0', '1e-2', out='sweep')
    g = grid['tasks']['mix']['grid']
    assert [(c['lr'], c['weight_decay']) for c in g] == [(1e-3, 0), (1e-3, 1e-2), (3e-5, 0), (3e-5, 1e-2)]
    for lr, wd in ((1e-3, 1e-2), (3e-5, 0)):
        one = run(data, 'ap', 'mix', *flags, '--lr', str(lr), '--weight_decay', str(wd), out=f'single{lr}{wd}')
        single = one['tasks']['mix']
        assert len(single['grid']) == 1 and single['lr'] == lr
        member = next(c for c in g if (c['lr'], c['weight_decay']) == (lr, wd))
        for a, b in zip(member['per_seed'], single['per_seed']):
            assert a['best_epoch'] == b['best_epoch']
            assert a['val'] == pytest.approx(b['val'], abs=1e-4) and a['test'] == pytest.approx(b['test'], abs=1e-4)
    chosen = grid['tasks']['mix']
    assert chosen['val_mean'] == max(c['val_mean'] for c in g)
    assert (chosen['lr'], chosen['weight_decay']) == next((c['lr'], c['weight_decay']) for c in g
                                                          if c['val_mean'] == chosen['val_mean'])
    assert grid['protocol']['lr'] == [1e-3, 3e-5] and 'Sweep' in open(
        os.path.join(data['root'], 'sweep', 'results.md')).read()


def test_sweep_selection_never_looks_at_test():
    runs = [[{'seed': s, 'best_epoch': 0, 'val': v, 'test': t, 'diverged': False}
             for v, t in ((50., 90.), (60., 10.), (60., 20.))] for s in (0, 1)]
    grid, chosen = mp.select(Task('t', 2), [(1, 0), (2, 0), (3, 0)], runs)
    assert chosen == 1 and grid[chosen]['test_mean'] == 10.   # best val; on a val tie, the first in grid order
    reg, chosen = mp.select(Task('r', 1, regression=True), [(1, 0), (2, 0), (3, 0)], runs)
    assert chosen == 0


FAULTS = """
import resource, sys, torch
from util.misc import keep_freed_memory
if sys.argv[1] == 'keep':
    assert keep_freed_memory()
def fill():
    torch.empty(16 * 2 ** 20).fill_(1.)   # 64 MB, touched, freed
for _ in range(6):   # the heap settles after a few (aligned blocks leave gaps at first)
    fill()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
    fill()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not (sys.platform.startswith('linux') and platform.libc_ver()[0] == 'glibc'),
                    reason='glibc allocator setting')
def test_freed_large_tensors_are_reused_without_new_page_faults():
    """After ``keep_freed_memory`` (which main_probe.py applies on CPU), a freed 64 MB tensor's memory is
    reused by the next ones once the heap has settled: a few page faults, where glibc's mmap faults in
    all 16k pages every time."""
    def faults(mode):
        r = subprocess.run([sys.executable, '-c', FAULTS, mode], capture_output=True, text=True, cwd=REPO,
                           env={**os.environ, 'OMP_NUM_THREADS': '1'})
        assert r.returncode == 0, r.stderr
        return int(r.stdout.split()[-1])
    assert faults('keep') < 1000 and faults('default') > 3 * 16000
