"""util/reconstruction.py on small hand-computed cases, and the pretraining diagnostics built on it."""
import argparse

import pytest
import torch

from engine_pretrain import evaluate, trivial_losses
from models_lvmae import LVMAE
from util.reconstruction import copy_nearest_visible, mean_prediction, retrieval_ranks


def e(*rows):
    return torch.tensor(rows, dtype=torch.float32)


def test_mean_prediction_everywhere():
    x = torch.zeros(2, 3, 2)
    pred = mean_prediction(x, torch.tensor([0.5, -1.0]))
    assert pred.shape == (2, 3, 2) and torch.equal(pred[1, 2], torch.tensor([0.5, -1.0]))


def test_copy_nearest_visible_hand_case():
    # video 0: 5 tokens, visible 0 and 3; video 1: 3 real tokens (+1 padding), visible 2 only
    x = torch.arange(1, 9, dtype=torch.float32).view(2, 4, 1).repeat(1, 1, 2)[:, :4]
    x = torch.cat([x, torch.tensor([[[9., 9.]], [[0., 0.]]])], dim=1)   # [2, 5, 2]; video 1 has 3 real tokens
    valid = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], dtype=torch.bool)
    mask = torch.tensor([[0, 1, 1, 0, 1], [1, 1, 0, 0, 0]], dtype=torch.bool)
    pred = copy_nearest_visible(x, mask, valid)
    # video 0: token 1 -> 0 (distance 1), token 2 -> 3 (1 vs 2), token 4 -> 3; visible tokens copy themselves
    assert pred[0, :, 0].tolist() == [1., 1., 4., 4., 4.]
    # video 1: everything copies its only visible token (index 2, value 7)
    assert pred[1, :3, 0].tolist() == [7., 7., 7.]


def test_copy_nearest_visible_ties_take_the_earlier_and_empty_video_gives_zeros():
    x = e([1., 0.], [0., 1.], [2., 2.]).unsqueeze(0).repeat(2, 1, 1)
    valid = torch.ones(2, 3, dtype=torch.bool)
    mask = torch.tensor([[0, 1, 0], [1, 1, 1]], dtype=torch.bool)
    pred = copy_nearest_visible(x, mask, valid)
    assert pred[0, 1].tolist() == [1., 0.]          # 0 and 2 both at distance 1: the earlier one
    assert torch.equal(pred[1], torch.zeros(3, 2))   # no visible token


def test_retrieval_ranks_hand_case():
    # one batch, two videos; candidates = the 4 real segments (padding excluded)
    x = torch.zeros(2, 3, 2)
    x[0, 0], x[0, 1], x[0, 2] = e([1., 0.]), e([0., 1.]), e([-1., 0.])
    x[1, 0] = e([0.6, 0.8])
    valid = torch.tensor([[1, 1, 1], [1, 0, 0]], dtype=torch.bool)
    mask = torch.tensor([[0, 1, 1], [1, 0, 0]], dtype=torch.bool)
    pred = torch.zeros(2, 3, 2)
    pred[0, 1] = e([0., 2.])        # exactly its truth (scale does not matter): rank 0
    pred[0, 2] = e([1., 0.1])       # truth (-1, 0) is the least similar of 4: rank 3
    pred[1, 0] = e([1., 0.])        # cos: (1,0) 1, (0.6,0.8) 0.6, (0,1) 0, (-1,0) -1: rank 1
    assert retrieval_ranks(x, pred, mask, valid).tolist() == [0, 3, 1]


def tiny_model(**kw):
    torch.manual_seed(0)
    return LVMAE(num_patches=16, input_size=8, depth=1, num_heads=2, decoder_embed_dim=8, decoder_depth=1,
                 decoder_num_heads=2, **kw)


def val_batches():
    g = torch.Generator().manual_seed(1)
    out = []
    for lengths in ([6, 4], [5]):
        x = torch.zeros(len(lengths), max(lengths), 8)
        for i, n in enumerate(lengths):
            x[i, :n] = torch.nn.functional.normalize(torch.randn(n, 8, generator=g), dim=-1)
        noise = torch.rand(len(lengths), max(lengths), generator=g)
        for i, n in enumerate(lengths):
            noise[i, n:] = 1
        out.append((x, torch.tensor(lengths), noise))
    return out


ARGS = argparse.Namespace(mask_ratio=0.5, masking_strategy=False, semantic_order='keep_changes', fp16=False)


def test_trivial_losses_equal_hand_computed_values():
    model = tiny_model()
    batches = val_batches()
    got = trivial_losses(model, batches, 'cpu', ARGS)
    videos = [(x[i, :n], noise[i, :n]) for x, lengths, noise in batches for i, n in enumerate(lengths.tolist())]
    mean = torch.cat([v for v, _ in videos]).mean(0)
    want_mean, want_copy = 0.0, 0.0
    for v, nz in videos:
        n = v.shape[0]
        kept = set(torch.argsort(nz)[:int(n * 0.5)].tolist())
        masked = [i for i in range(n) if i not in kept]
        want_mean += sum(((v[i] - mean) ** 2).mean().item() for i in masked) / len(masked)
        nearest = {i: min(kept, key=lambda k: (abs(k - i), k)) for i in masked}
        want_copy += sum(((v[i] - v[nearest[i]]) ** 2).mean().item() for i in masked) / len(masked)
    assert got['mean'] == pytest.approx(want_mean / len(videos), rel=1e-5)
    assert got['copy'] == pytest.approx(want_copy / len(videos), rel=1e-5)


def test_evaluate_reports_loss_and_retrieval():
    model = tiny_model()
    batches = val_batches()
    val = evaluate(model, batches, 'cpu', ARGS)
    assert set(val) == {'loss', 'retrieval_top1', 'retrieval_rank'}
    assert 0 <= val['retrieval_top1'] <= 100 and 0 <= val['retrieval_rank'] <= 1
    # a model that returns the truth everywhere retrieves every masked segment first and has loss 0
    model.forward = lambda x, lengths, mask=None, **kw: (None, x.clone(), mask.float())
    val = evaluate(model, batches, 'cpu', ARGS)
    assert val['loss'] == 0 and val['retrieval_top1'] == 100 and val['retrieval_rank'] == 0
