"""How good is a reconstruction: trivial predictors to compare the model's with, and retrieval.

All functions take the batch the model sees: ``x [B, L, D]`` (the original segment embeddings,
zeros past each video's length), ``mask [B, L]`` (True on masked tokens) and ``valid [B, L]`` (True
on real tokens). Their predictions ``[B, L, D]`` are scored with the model's own ``forward_loss``, so
that the numbers compare with its loss.
"""
import torch
import torch.nn.functional as F


def mean_prediction(x, mean):
    """Predict the same embedding ``mean [D]`` (e.g. the mean embedding of a data set) everywhere."""
    return mean.to(x.dtype).expand_as(x)


def copy_nearest_visible(x, mask, valid):
    """Predict each masked token by the visible token of its video nearest in time (the earlier one
    on ties); a video without visible tokens predicts zeros."""
    B, L, _ = x.shape
    visible = valid & ~mask
    pos = torch.arange(L, device=x.device)
    # distance from every token to every visible token of its video; invisible ones are far away
    dist = (pos[None, :, None] - pos[None, None, :]).abs().float().expand(B, L, L).clone()
    dist = dist.masked_fill(~visible[:, None, :], float('inf'))
    nearest = dist.argmin(-1)                                   # first minimum = the earlier token on ties
    pred = torch.gather(x, 1, nearest[..., None].expand_as(x))
    return pred * visible.any(1)[:, None, None].to(x.dtype)


def retrieval_ranks(x, pred, mask, valid):
    """For every masked real token: the rank of its true embedding among all real segments of the
    batch, ordered by cosine similarity to its reconstruction (0 = the true segment is the most
    similar). Candidates that tie with the true segment (e.g. an identical segment elsewhere) do not
    count against it; a reconstruction with no direction (all zeros) or a non-finite value gets the
    worst rank, N - 1 for N candidates. Masked padding is ignored. Returns a 1-D long tensor, one
    rank per masked token, in (video, position) order (batch of one video: the candidates are that
    video's own segments)."""
    D = x.shape[-1]
    mask = mask & valid
    cand = F.normalize(x[valid].float(), dim=-1)               # [N, D] all real segments of the batch
    flat_index = torch.cumsum(valid.flatten().long(), 0) - 1   # index in ``cand`` of each real token
    target = flat_index.view(valid.shape)[mask]                # [M] index of each masked token's truth
    raw = pred[mask].float().reshape(-1, D)
    usable = torch.isfinite(raw).all(-1) & (raw.norm(dim=-1) > 0)
    query = F.normalize(torch.where(usable[:, None], raw, torch.zeros_like(raw)), dim=-1)
    sims = query @ cand.T                                      # [M, N]
    true_sim = sims.gather(1, target[:, None])
    ranks = (sims > true_sim).sum(1)
    return torch.where(usable, ranks, torch.full_like(ranks, cand.shape[0] - 1))
