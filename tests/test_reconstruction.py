"""util/reconstruction.py on small cases computed by hand."""
import torch

from util.reconstruction import copy_nearest_visible, mean_prediction, retrieval_ranks


def onehots(rows, D=5):
    """``[len(rows), D]`` with a 1 at each row's index (orthonormal segments)."""
    return torch.eye(D)[rows]


def test_mean_prediction_everywhere_in_the_input_dtype():
    x = torch.zeros(2, 3, 4, dtype=torch.float64)
    mean = torch.tensor([1., 2., 3., 4.])
    pred = mean_prediction(x, mean)
    assert pred.shape == x.shape and pred.dtype == torch.float64
    assert torch.equal(pred[1, 2], mean.double()) and torch.equal(pred[0, 0], mean.double())


def test_copy_nearest_visible_by_hand():
    # video 0: 5 segments, visible at 1 and 3; segment 2 is equally far from both -> the earlier (1)
    # video 1: 3 real segments + 2 padding, visible at 0 only; padding (not masked) is never copied
    # video 2: every real segment masked -> zeros
    x = torch.zeros(3, 5, 5)
    x[0] = onehots([0, 1, 2, 3, 4])
    x[1, :3] = onehots([4, 3, 2])
    x[1, 3:] = 7.0                                     # garbage in the padding must not leak
    x[2, :2] = onehots([0, 1])
    valid = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 0, 0, 0]], dtype=torch.bool)
    mask = torch.tensor([[1, 0, 1, 0, 1], [0, 1, 1, 0, 0], [1, 1, 0, 0, 0]], dtype=torch.bool)
    pred = copy_nearest_visible(x, mask, valid)
    src0 = [1, 1, 1, 3, 3]                             # 0<-1, 1 itself, 2<-1 (tie: earlier), 3 itself, 4<-3
    assert torch.equal(pred[0], x[0, src0])
    assert torch.equal(pred[1, :3], x[1, [0, 0, 0]])   # 2 is nearer padding 3 but copies segment 0
    assert torch.equal(pred[2], torch.zeros(5, 5))


def test_copy_nearest_visible_tie_goes_to_the_earlier_token_at_every_distance():
    L = 9
    x = onehots(list(range(L)), D=L)[None]
    mask = torch.ones(1, L, dtype=torch.bool)
    mask[0, [0, 8]] = False                            # 4 is 4 away from both
    pred = copy_nearest_visible(x, mask, torch.ones(1, L, dtype=torch.bool))
    src = pred[0].argmax(-1).tolist()
    assert src == [0, 0, 0, 0, 0, 8, 8, 8, 8]


def test_retrieval_perfect_reconstruction_ranks_zero():
    x = torch.zeros(2, 3, 5)
    x[0] = onehots([0, 1, 2])
    x[1, :2] = onehots([3, 4])
    valid = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.bool)
    mask = torch.tensor([[0, 1, 1], [1, 0, 0]], dtype=torch.bool)
    ranks = retrieval_ranks(x, 3.0 * x, mask, valid)   # scale does not matter, direction does
    assert ranks.tolist() == [0, 0, 0]
    assert ranks.dtype == torch.long


def test_retrieval_rank_counts_more_similar_candidates_across_the_batch():
    x = torch.zeros(2, 3, 5)
    x[0] = onehots([0, 1, 2])
    x[1, :1] = onehots([3])
    valid = torch.tensor([[1, 1, 1], [1, 0, 0]], dtype=torch.bool)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=torch.bool)
    pred = torch.zeros(2, 3, 5)
    pred[0, 0] = torch.tensor([0.1, 0.5, 0.4, 0.0, 0.0])   # truth e0; e1 and e2 more similar -> 2
    pred[0, 1] = torch.tensor([0.0, 0.5, 0.0, 0.6, 0.0])   # truth e1; e3 (other video) more similar -> 1
    pred[1, 0] = torch.tensor([0.0, 0.0, 0.0, 1.0, 0.0])   # truth e3 -> 0
    assert retrieval_ranks(x, pred, mask, valid).tolist() == [2, 1, 0]


def test_retrieval_padding_is_neither_candidate_nor_query():
    x = torch.zeros(1, 4, 5)
    x[0, :3] = onehots([0, 1, 2])
    x[0, 3] = torch.tensor([0.0, 0.0, 0.0, 0.0, 1.0])      # padding content
    valid = torch.tensor([[1, 1, 1, 0]], dtype=torch.bool)
    mask = torch.tensor([[0, 1, 0, 1]], dtype=torch.bool)  # a masked padding token is ignored
    pred = torch.zeros(1, 4, 5)
    pred[0, 1] = torch.tensor([0.0, 0.6, 0.0, 0.0, 0.8])   # closest to the padding row, then to e1
    ranks = retrieval_ranks(x, pred, mask, valid)
    assert ranks.tolist() == [0]                           # padding not a candidate; one query


def test_retrieval_ties_do_not_count_and_degenerate_predictions_rank_last():
    x = onehots([0, 1, 0, 2])[None]                        # segment 2 repeats segment 0
    valid = torch.ones(1, 4, dtype=torch.bool)
    mask = torch.tensor([[1, 1, 1, 0]], dtype=torch.bool)
    pred = x.clone()
    pred[0, 1] = 0.0                                       # no direction: worst rank (4 candidates -> 3)
    pred[0, 2, 0] = float('nan')                           # non-finite: worst rank
    assert retrieval_ranks(x, pred, mask, valid).tolist() == [0, 3, 3]
    # the copy baseline of a video without visible tokens predicts zeros: ranked last, not first
    none_visible = torch.ones(1, 4, dtype=torch.bool)
    zeros = copy_nearest_visible(x, none_visible, valid)
    assert retrieval_ranks(x, zeros, none_visible, valid).tolist() == [3, 3, 3, 3]
