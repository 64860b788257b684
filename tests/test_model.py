import argparse
import os

import pytest
import torch
import torch.nn.functional as F

from models_lvmae import LVMAE, lvmae_paper
from util.checkpoint import CheckpointError, checkpoint_args, load_checkpoint, load_model_state, save_checkpoint
from util.errors import InputError

D = 32


def tiny(**kw):
    torch.manual_seed(0)
    cfg = dict(num_patches=64, input_size=D, depth=2, num_heads=4, decoder_embed_dim=16,
               decoder_depth=1, decoder_num_heads=2)
    cfg.update(kw)
    return LVMAE(**cfg).eval()


def batch(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.zeros(len(lengths), max(lengths), D)
    for i, n in enumerate(lengths):
        x[i, :n] = F.normalize(torch.randn(n, D, generator=g), dim=-1)
    return x, torch.tensor(lengths)


def test_state_dict_names_and_strict_roundtrip(tmp_path):
    model = tiny()
    names = set(model.state_dict())
    for n in ['cls_token', 'pos_embed', 'blocks.0.norm1.weight', 'blocks.0.attn.qkv.weight', 'blocks.0.attn.qkv.bias',
              'blocks.0.attn.proj.weight', 'blocks.0.norm2.weight', 'blocks.0.mlp.fc1.weight', 'blocks.0.mlp.fc2.weight',
              'norm.weight', 'decoder_embed.weight', 'mask_token', 'decoder_pos_embed', 'decoder_blocks.0.attn.qkv.weight',
              'decoder_norm.weight', 'decoder_pred.weight']:
        assert n in names, n
    # the original release's checkpoint layout: {'model': ..., 'args': argparse.Namespace}
    path = tmp_path / 'checkpoint-0.pth'
    save_checkpoint(path, {'model': model.state_dict(), 'epoch': 0, 'args': argparse.Namespace(depth=2)})
    other = tiny()
    torch.nn.init.normal_(other.cls_token)
    other.load_state_dict(load_checkpoint(path)['model'], strict=True)
    for k, v in model.state_dict().items():
        assert torch.equal(v, other.state_dict()[k]), k
    with pytest.raises(RuntimeError, match=r'blocks\.0\.attn\.qkv\.weight: checkpoint \(96, 32\) vs model \(48, 16\)'):
        load_model_state(LVMAE(num_patches=64, input_size=16, depth=2, num_heads=4, decoder_embed_dim=16,
                               decoder_depth=1, decoder_num_heads=2), load_checkpoint(path)['model'], path)


def test_paper_sizes():
    with torch.device('meta'):
        model = lvmae_paper()
    enc = sum(p.numel() for n, p in model.named_parameters() if not n.startswith(('decoder', 'mask_token')))
    dec = sum(p.numel() for n, p in model.named_parameters() if n.startswith(('decoder', 'mask_token')))
    assert 400e6 < enc < 406e6 and 25e6 < dec < 28e6, (enc, dec)


def test_sincos_positions():
    model = tiny()
    pe = model.pos_embed[0]
    assert torch.all(pe[0] == 0)
    assert torch.allclose(pe[1, :D // 2], torch.zeros(D // 2)) and torch.allclose(pe[1, D // 2:], torch.ones(D // 2))
    assert torch.allclose(pe[3, 0], torch.sin(torch.tensor(2.0)))
    assert not model.pos_embed.requires_grad and not model.decoder_pos_embed.requires_grad


@pytest.mark.parametrize('ratio', [0.4, 0.5, 0.75, 0.9])
def test_masked_count_per_sample(ratio):
    model = tiny()
    lengths = [1, 2, 3, 7, 10, 31, 64]
    x, n = batch(lengths)
    for semantic in [False, True, 'mask_changes']:
        _, _, mask = model(x, n, mask_ratio=ratio, semantic=semantic)
        for i, L in enumerate(lengths):
            assert mask[i].sum().item() == L - int(L * (1 - ratio))
            assert mask[i, L:].sum() == 0


def test_semantic_masking_keeps_lowest_similarity():
    model = tiny()
    x, n = batch([20, 13], seed=3)
    mask = model.make_mask(x, n, 0.5, semantic=True)
    for i, L in enumerate([20, 13]):
        sims = [0.0] + [F.cosine_similarity(x[i, t], x[i, t - 1], dim=0).item() for t in range(1, L)]
        k = int(L * 0.5)
        expected = sorted(range(L), key=lambda t: sims[t])[:k]
        assert sorted((~mask[i, :L]).nonzero().flatten().tolist()) == sorted(expected)
    reverse = model.make_mask(x, n, 0.5, semantic='mask_changes')
    assert not torch.equal(mask, reverse)
    assert reverse[0, 0]  # the first token (similarity 0) is masked when change points are masked


def test_random_masking_follows_noise():
    model = tiny()
    x, n = batch([10])
    noise = torch.arange(10, dtype=torch.float).flip(0)[None]  # lowest noise at the end
    mask = model.make_mask(x, n, 0.5, noise=noise)
    assert mask[0].tolist() == [True] * 5 + [False] * 5


def test_padding_invariance():
    model = tiny()
    xb, nb = batch([9, 30, 17], seed=1)
    x1 = xb[:1, :9]
    mask_b = torch.zeros(3, 30, dtype=torch.bool)
    mask_b[:, [1, 4, 5, 8]] = True
    loss_b, pred_b, _ = model(xb, nb, mask=mask_b)
    loss_1, pred_1, _ = model(x1, nb[:1], mask=mask_b[:1, :9])
    assert torch.allclose(pred_b[0, :9], pred_1[0], atol=1e-5)
    per_video = model.forward_loss(xb, pred_b, mask_b & model.valid_mask(nb, 30), reduction='none')
    assert torch.allclose(per_video[0], loss_1, atol=1e-6)
    feats_b = model.forward_features(xb, nb)
    feats_1 = model.forward_features(x1, nb[:1])
    assert torch.allclose(feats_b[0, :10], feats_1[0], atol=1e-5)


def test_loss_counts_masked_tokens_only():
    model = tiny()
    x, n = batch([12])
    mask = torch.zeros(1, 12, dtype=torch.bool)
    mask[0, [2, 3, 7]] = True
    loss, pred, _ = model(x, n, mask=mask)
    expected = ((pred[0, [2, 3, 7]] - x[0, [2, 3, 7]]) ** 2).mean()
    assert torch.allclose(loss, expected, atol=1e-6)
    model.cos_loss = True
    loss_cos, pred, _ = model(x, n, mask=mask)
    expected = (1 - F.cosine_similarity(pred[0, [2, 3, 7]], x[0, [2, 3, 7]], dim=-1)).mean()
    assert torch.allclose(loss_cos, expected, atol=1e-6)


def test_encoder_never_sees_masked_or_padded_tokens():
    model = tiny()
    x, n = batch([8, 14], seed=2)
    mask = torch.zeros(2, 14, dtype=torch.bool)
    mask[:, [0, 3, 6]] = True
    loss, pred, _ = model(x, n, mask=mask)
    x2 = x.clone()
    x2[:, [0, 3, 6]] = torch.randn(2, 3, D)        # masked places: the loss changes, pred must not
    loss2, pred2, _ = model(x2, n, mask=mask)
    assert torch.allclose(pred, pred2, atol=1e-6) and not torch.allclose(loss, loss2)
    x3 = x.clone()
    x3[0, 8:] = torch.randn(6, D)                  # past video 0's length
    loss3, pred3, _ = model(x3, n, mask=mask)
    assert torch.allclose(pred[0, :8], pred3[0, :8], atol=1e-6) and torch.allclose(loss, loss3, atol=1e-6)
    feats = model.forward_features(x, n)
    feats3 = model.forward_features(x3, n)
    assert torch.allclose(feats[0, :9], feats3[0, :9], atol=1e-6)


def test_positions_follow_original_places():
    """Visible tokens carry their original positions: moving which tokens are visible changes the output."""
    model = tiny()
    x, n = batch([10])
    x[0, 5] = x[0, 2]
    m1 = torch.ones(1, 10, dtype=torch.bool)
    m1[0, 2] = False
    m2 = torch.ones(1, 10, dtype=torch.bool)
    m2[0, 5] = False
    _, p1, _ = model(x, n, mask=m1)
    _, p2, _ = model(x, n, mask=m2)
    assert not torch.allclose(p1, p2, atol=1e-4)


def test_gradients_and_backward_with_norm_pix_loss():
    model = tiny(norm_pix_loss=True).train()
    x, n = batch([5, 11])
    loss, _, _ = model(x, n, mask_ratio=0.5)
    loss.backward()
    assert torch.isfinite(loss)
    assert model.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    assert model.pos_embed.grad is None


def test_too_long_is_an_error():
    model = tiny(num_patches=8)
    x, n = batch([9])
    with pytest.raises(ValueError, match='longer than num_patches=8'):
        model(x, n)


class _Opaque:   # an object that weights-only loading refuses
    pass


def test_checkpoint_with_other_objects_needs_trust(tmp_path, capsys):
    model = tiny()
    path = tmp_path / 'original.pth'
    save_checkpoint(path, {'model': model.state_dict(), 'args': argparse.Namespace(extra=_Opaque())})
    with pytest.raises(CheckpointError, match='--trust_checkpoint') as e:
        load_checkpoint(path)
    assert 'Unsupported global' in str(e.value) and '_Opaque' in str(e.value) and '\n' not in str(e.value)
    assert isinstance(e.value, InputError)
    ckpt = load_checkpoint(path, trust=True)
    assert 'full unpickling' in capsys.readouterr().out
    assert torch.equal(ckpt['model']['cls_token'], model.cls_token)
    (tmp_path / 'bad.pth').write_bytes(b'not a checkpoint')
    with pytest.raises(RuntimeError, match='bad.pth: unreadable checkpoint'):
        load_checkpoint(tmp_path / 'bad.pth')


def test_original_release_args_namespace_loads_safely(tmp_path):
    path = tmp_path / 'original.pth'
    save_checkpoint(path, {'model': tiny().state_dict(), 'args': argparse.Namespace(num_heads=4, blr=1e-3)})
    assert checkpoint_args(load_checkpoint(path)) == {'num_heads': 4, 'blr': 1e-3}


def test_checkpoint_without_fixed_position_tables_loads_them_from_the_model(tmp_path):
    """The sin-cos tables are not learned: a checkpoint that leaves out pos_embed or
    decoder_pos_embed loads whole (pretraining resume, reconstruction) and computes the same."""
    model = tiny()
    sd = {k: v for k, v in model.state_dict().items() if k not in ('pos_embed', 'decoder_pos_embed')}
    torch.nn.init.normal_(sd['cls_token'])
    other = tiny()
    load_model_state(other, sd, tmp_path / 'original.pth')
    assert torch.equal(other.cls_token, sd['cls_token'])
    assert torch.equal(other.pos_embed, model.pos_embed) and torch.equal(other.decoder_pos_embed, model.decoder_pos_embed)
    with pytest.raises(CheckpointError, match='missing in checkpoint: cls_token'):
        load_model_state(other, {k: v for k, v in sd.items() if k != 'cls_token'}, tmp_path / 'original.pth')


def test_bf16_checkpoint_resumes_in_the_original_release_fp16_scaler(tmp_path):
    """Our checkpoints of runs without loss scaling (bf16, CPU) resume in the original release, whose
    MAE-style resume loads ckpt['scaler'] into an fp16 GradScaler: an empty state is refused there."""
    from util import misc
    model = tiny()
    optimizer = torch.optim.AdamW(model.parameters())
    args = argparse.Namespace(output_dir=str(tmp_path), resume='', no_auto_resume=False, start_epoch=0)
    misc.save_model(args, 3, model, optimizer, torch.amp.GradScaler('cuda', enabled=False))
    ckpt = torch.load(tmp_path / 'checkpoint-3.pth', weights_only=True)
    torch.amp.GradScaler('cpu').load_state_dict(ckpt['scaler'])          # what the original release does
    misc.resume(args, tiny(), torch.optim.AdamW(tiny().parameters()), torch.amp.GradScaler('cuda', enabled=False))
    assert args.start_epoch == 4


def test_optimizer_state_of_other_groups_or_order_is_an_error(tmp_path):
    """An original-release checkpoint whose optimizer grouped or ordered the parameters otherwise: one
    error naming the file, not a failure (or, for parameters of one shape, wrong moments) at the first step."""
    from engine_pretrain import param_groups
    from util import misc
    x, n = batch([6, 4])
    for name, groups in [('one_group', lambda m: m.parameters()),
                         ('reversed', lambda m: [dict(g, params=g['params'][::-1]) for g in param_groups(m, 0.05)])]:
        model = tiny()
        optimizer = torch.optim.AdamW(groups(model))
        model(x, n, 0.5)[0].backward()
        optimizer.step()
        path = tmp_path / f'{name}.pth'
        torch.save({'model': model.state_dict(), 'optimizer': optimizer.state_dict(), 'epoch': 9,
                    'args': argparse.Namespace(depth=2)}, path)
        args = argparse.Namespace(output_dir=str(tmp_path), resume=str(path), no_auto_resume=True, start_epoch=0)
        other = tiny()
        with pytest.raises(CheckpointError, match=f'{name}.pth: the optimizer state does not fit the model'):
            misc.resume(args, other, torch.optim.AdamW(param_groups(other, 0.05)),
                        torch.amp.GradScaler('cuda', enabled=False))


# ---------------------------------------------------------------- loss reduction
def unequal_masked_batch():
    """Videos of 4, 20 and 11 segments with 1, 12 and 3 masked tokens."""
    x, n = batch([4, 20, 11], seed=3)
    mask = torch.zeros(3, 20, dtype=torch.bool)
    mask[0, [1]] = True
    mask[1, 2:14] = True
    mask[2, [0, 5, 9]] = True
    return x, n, mask


def test_default_loss_is_the_mean_over_all_masked_tokens_of_the_batch():
    model = tiny()
    x, n, mask = unequal_masked_batch()
    loss, pred, m = model(x, n, mask=mask)
    per_token = [((pred[b, t] - x[b, t]) ** 2).mean() for b in range(3) for t in range(20) if mask[b, t]]
    assert len(per_token) == 16 and m.sum() == 16
    torch.testing.assert_close(loss, torch.stack(per_token).mean(), rtol=1e-6, atol=1e-7)
    total, count = model.forward_loss(x, pred, mask, reduction='sum')
    torch.testing.assert_close(total / count, loss)
    # per-video means weigh the 1-token video as much as the 12-token one: a different number
    per_video = [((pred[b, mask[b]] - x[b, mask[b]]) ** 2).mean() for b in range(3)]
    assert abs(torch.stack(per_video).mean() - loss) > 1e-4


def test_video_reduction_is_the_mean_of_per_video_means():
    model = tiny(loss_reduction='video')
    x, n, mask = unequal_masked_batch()
    loss, pred, _ = model(x, n, mask=mask)
    per_video = [((pred[b, mask[b]] - x[b, mask[b]]) ** 2).mean() for b in range(3)]
    torch.testing.assert_close(loss, torch.stack(per_video).mean(), rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match='loss_reduction'):
        tiny(loss_reduction='tokens')


def test_input_scale_multiplies_the_inputs_not_the_targets():
    x, lengths = batch([7, 5], seed=3)
    mask = LVMAE.valid_mask(lengths, 7) & (torch.arange(7) % 2 == 1)
    scaled, plain = tiny(input_scale=3.0), tiny()
    loss_s, pred_s, _ = scaled(x, lengths, mask=mask)
    _, pred_p, _ = plain(3.0 * x, lengths, mask=mask)
    assert torch.allclose(pred_s, pred_p, atol=1e-5)
    assert torch.allclose(loss_s, plain.forward_loss(x, pred_p, mask), atol=1e-6)   # targets: unit-norm x
    assert torch.allclose(scaled.forward_features(x, lengths), plain.forward_features(3.0 * x, lengths), atol=1e-5)
    assert not torch.allclose(scaled.forward_features(x, lengths), plain.forward_features(x, lengths), atol=1e-3)


def test_input_scale_auto_and_bad_values():
    assert tiny(input_scale='auto').input_scale == pytest.approx((D / 2) ** 0.5)    # 4.0 at width 32
    assert tiny(input_scale='auto', embed_dim=8).input_scale == pytest.approx(2.0)  # the encoder width counts
    assert tiny().input_scale == 1.0 and tiny(input_scale='2.5').input_scale == 2.5
    # 'auto' is the norm of a position row
    pe = tiny(input_scale='auto').pos_embed[0, 1:]
    assert torch.allclose(pe.norm(dim=-1), torch.full((64,), (D / 2) ** 0.5))
    for bad in ('0', '-1', 'nan', 'big'):
        with pytest.raises(ValueError, match='input_scale must be a positive number or "auto"'):
            tiny(input_scale=bad)


# ---------------------------------------------------------------- padding to a multiple (GPU shapes)
def test_padding_to_a_multiple_changes_no_result():
    """The same batch padded to its longest video (13) and to a multiple of 8 (16), as the dataset pads
    it (zeros past each length, noise 1 past each length; see test_pretrain.py for the dataset)."""
    xa, la = batch([5, 13, 9], seed=4)
    g = torch.Generator().manual_seed(1)
    na = torch.rand(3, 13, generator=g).masked_fill(~LVMAE.valid_mask(la, 13), 1)
    xb, lb, nb = F.pad(xa, (0, 0, 0, 3)), la, F.pad(na, (0, 3), value=1)
    plain, padded = tiny(), tiny()
    padded.pad_multiple = 8
    loss_a, pred_a, mask_a = plain(xa, la, 0.5, noise=na)
    loss_b, pred_b, mask_b = padded(xb, lb, 0.5, noise=nb)
    latent, _ = padded.forward_encoder(xb, mask_b.bool(), LVMAE.valid_mask(lb, 16))
    assert latent.shape[1] == 1 + 8                      # 6 visible at most, padded to 8
    assert torch.equal(mask_b[:, :13], mask_a) and not mask_b[:, 13:].any()
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(pred_b[:, :13], pred_a, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- architecture from a checkpoint, bad flags
def test_resolve_arch_notes_unknown_head_counts_and_rejects_heads_that_do_not_divide():
    from util.checkpoint import ArchitectureError, resolve_arch
    sd = tiny().state_dict()                       # no stored args: heads cannot be read from shapes
    arch, notes = resolve_arch({}, sd, {}, source='ckpt')
    assert arch['depth'] == 2 and arch['decoder_depth'] == 1 and arch['input_size'] == D
    assert notes == ['num_heads', 'decoder_num_heads']
    _, notes = resolve_arch({}, sd, {'num_heads': 4, 'decoder_num_heads': 2}, source='ckpt')
    assert notes == []
    with pytest.raises(ArchitectureError, match='--num_heads 5 does not divide the encoder width 32'):
        resolve_arch({}, sd, {'num_heads': 5}, source='ckpt')
    with pytest.raises(ArchitectureError, match='decoder_num_heads 3 does not divide the decoder width 16'):
        resolve_arch({}, sd, {'decoder_num_heads': 3}, source='ckpt')


def test_unwritable_output_folder_and_missing_gpu_are_input_errors(tmp_path):
    from util.fileio import FolderLock
    from util.misc import default_device
    blocker = tmp_path / 'file'
    blocker.write_text('not a folder')
    with pytest.raises(InputError, match='cannot create or write the output folder'):
        FolderLock(str(blocker / 'out'))
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match='CUDA is not available'):
            default_device('cuda:0')
    assert default_device('cpu') == 'cpu'


def test_encoder_only_users_skip_the_decoder_head_check_and_contradicting_heads_are_errors():
    from util.checkpoint import ArchitectureError, resolve_arch
    sd = tiny(decoder_embed_dim=24, decoder_num_heads=2).state_dict()   # 24 is not divisible by the paper's 16
    with pytest.raises(ArchitectureError, match='decoder width 24'):
        resolve_arch({}, sd, {'num_heads': 4})
    arch, notes = resolve_arch({}, sd, {'num_heads': 4}, decoder=False)   # the probes drop the decoder
    assert arch['decoder_embed_dim'] == 24 and notes == []
    with pytest.raises(ArchitectureError, match='--decoder_num_heads 4 but the checkpoint was trained with '
                                                'decoder_num_heads=2'):
        resolve_arch({'decoder_num_heads': 2}, sd, {'decoder_num_heads': 4})


def test_folder_lock_on_a_file_system_without_locks(tmp_path, monkeypatch):
    import errno
    import fcntl

    from util import fileio

    def no_locks(*a):
        raise OSError(errno.ENOLCK, 'No locks available')
    monkeypatch.setattr(fcntl, 'flock', no_locks)
    lock = fileio.FolderLock(str(tmp_path / 'out'))      # runs unlocked rather than not at all
    assert (tmp_path / 'out' / '.lock').read_text() == f'pid {os.getpid()}'
    lock.release()
    assert lock.fd is None
    lock.release()                                      # twice is harmless


def test_atomic_write_flushes_the_data_before_the_rename(tmp_path, monkeypatch):
    """A checkpoint's name never points at data still in the page cache: after a crash of the machine
    the newest checkpoint (which auto-resume picks) could otherwise be empty."""
    events, replace = [], os.replace
    monkeypatch.setattr(os, 'fsync', lambda fd: events.append(('fsync', os.fstat(fd).st_size)))
    monkeypatch.setattr(os, 'replace', lambda a, b: (events.append(('replace', os.path.getsize(a))), replace(a, b)))
    save_checkpoint(tmp_path / 'checkpoint-1.pth', {'model': tiny().state_dict()})
    size = os.path.getsize(tmp_path / 'checkpoint-1.pth')
    assert events == [('fsync', size), ('replace', size)]


def test_same_checkpoint_same_bytes(tmp_path):
    """The same state saved twice gives the same file: torch.save named the archive's records after the
    file it wrote, the temporary file's random name (``.checkpoint-1.pth.<random>/data.pkl``), so two
    runs of the same command wrote checkpoints of other bytes (and other sha256 in the probes' results)."""
    torch.manual_seed(0)
    state = {'model': tiny().state_dict(), 'epoch': 1}
    save_checkpoint(tmp_path / 'checkpoint-1.pth', state)
    first = (tmp_path / 'checkpoint-1.pth').read_bytes()
    save_checkpoint(tmp_path / 'checkpoint-1.pth', state)
    assert (tmp_path / 'checkpoint-1.pth').read_bytes() == first
    assert b'.tmp' not in first and b'checkpoint-1.pth.' not in first
