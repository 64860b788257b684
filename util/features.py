"""Probe inputs: a split's videos as windows stored flat (``Items``), the frozen encoder's pass over
them (``Featurizer``), and the cache of its outputs (``Items.featurize``).

The encoder is frozen and its input not augmented, so its output is computed once per video (in
length-sorted batches) and the heads train on that; a linear probe keeps only the mean.
"""
import math
import os

import numpy as np
import torch

from util.embeddings import EmbeddingError, load_row, read_csv, read_metadata
from util.errors import InputError

FEATURE_DTYPES = {'fp32': None, 'bf16': torch.bfloat16}
_MAX_LABEL = math.sqrt(float(np.finfo(np.float32).max))   # a larger target's squared error overflows float32


class NonFiniteError(InputError):
    """A value that is not a finite number (features, labels, a loss): says where it was found."""


class Featurizer:
    """Raw windows ``x [B, L, D], lengths [B]`` -> head input ``(tokens [B, T, E], lengths [B])``:
    the frozen encoder's output (CLS first) for AP, its mean over the real segments (T = 1) for LP.
    ``encoder=None`` (``--baseline raw``) passes the raw embeddings (or their mean).
    ``dtype``: 'fp32' (default, as the original release) or 'bf16' (autocast of the encoder pass)."""

    def __init__(self, encoder, pooled, dtype='fp32'):
        if dtype not in FEATURE_DTYPES:
            raise ValueError(f'feature dtype must be one of {tuple(FEATURE_DTYPES)}, got {dtype!r}')
        self.encoder, self.pooled, self.dtype = encoder, pooled, dtype

    def out_length(self, n):
        return 1 if self.pooled else n + (self.encoder is not None)

    @torch.no_grad()
    def __call__(self, x, lengths):
        if self.encoder is not None:
            low = FEATURE_DTYPES[self.dtype]
            with torch.autocast(x.device.type, dtype=low, enabled=low is not None):
                x = self.encoder.forward_features(x, lengths).float()
            if not self.pooled:
                return x, lengths + 1
            x = x[:, 1:]
        if not self.pooled:
            return x, lengths
        valid = (torch.arange(x.shape[1], device=x.device)[None] < lengths[:, None]).to(x.dtype)
        mean = (x * valid[..., None]).sum(1) / lengths[:, None].to(x.dtype)
        return mean[:, None], torch.ones_like(lengths)


class Items:
    """The windows of a split's videos stored flat: ``data [rows, D]``, item ``i`` is
    ``data[start[i]:start[i] + length[i]]`` and belongs to video ``video[i]``. Holds raw windows, or
    (cache) the featurizer's outputs. ``first[v]``/``count[v]``: the items of video ``v``."""

    def __init__(self, data, start, length, video, labels):
        self.data, self.start, self.length, self.video, self.labels = data, start, length, video, labels
        self.count = torch.bincount(video, minlength=len(labels))
        self.first = torch.cumsum(self.count, 0) - self.count

    @classmethod
    def from_videos(cls, seqs, labels, num_patches, long_video):
        """Videos longer than ``num_patches``: the first window, or (``long_video``) all consecutive ones."""
        wins, video = [], []
        for v, s in enumerate(seqs):
            chunks = s.split(num_patches) if long_video else [s[:num_patches]]
            wins += chunks
            video += [v] * len(chunks)
        length = torch.tensor([w.shape[0] for w in wins])
        return cls(torch.cat(wins), torch.cumsum(length, 0) - length, length, torch.tensor(video), labels)

    def gather(self, items, device):
        """Padded ``x [n, T, D]`` and ``lengths [n]`` of the given items."""
        length = self.length[items]
        T = int(length.max())
        valid = torch.arange(T)[None] < length[:, None]
        idx = (self.start[items][:, None] + torch.arange(T)[None]).where(valid, 0)
        x = self.data[idx.to(self.data.device)].to(device)
        return x * valid[..., None].to(device, x.dtype), length.to(device)

    def batch(self, videos, device):
        """Items of ``videos``: ``x, lengths`` and ``owner`` (position of each item's video in ``videos``)."""
        cnt = self.count[videos]
        owner = torch.repeat_interleave(torch.arange(len(videos)), cnt)
        rank = torch.arange(len(owner)) - (torch.cumsum(cnt, 0) - cnt)[owner]   # index among its video's items
        items = self.first[videos][owner] + rank
        x, lengths = self.gather(items, device)
        return x, lengths, owner.to(device)

    def featurize(self, featurizer, batch_size, device, memmap_path=None):
        """Cache: run ``featurizer`` once over all items (length-sorted batches); ``memmap_path``
        puts the result in a memory-mapped file instead of memory."""
        out_len = torch.tensor([featurizer.out_length(int(n)) for n in self.length])
        start = torch.cumsum(out_len, 0) - out_len
        rows = int(out_len.sum())
        order = torch.argsort(self.length, stable=True)
        data = None
        for i in range(0, len(order), batch_size):
            items = order[i:i + batch_size]
            y, ylen = featurizer(*self.gather(items, device))
            if data is None:
                shape = (rows, y.shape[-1])
                data = torch.from_numpy(np.lib.format.open_memmap(memmap_path, 'w+', np.float32, shape)) \
                    if memmap_path else torch.empty(shape, device=device)
            valid = torch.arange(y.shape[1], device=y.device)[None] < ylen[:, None]
            dst = (start[items].to(y.device)[:, None] + torch.arange(y.shape[1], device=y.device)[None])[valid]
            data[dst.to(data.device)] = y[valid].float().to(data.device)
        return Items(data, start, out_len, self.video, self.labels)

    def check_finite(self, what):
        """Raise ``NonFiniteError`` naming ``what`` and the first video whose data is not finite."""
        bad = ~torch.isfinite(self.data).all(-1)
        if bool(bad.any()):
            row = int(bad.nonzero()[0, 0])
            item = int(torch.searchsorted(self.start, torch.tensor(row), right=True)) - 1
            raise NonFiniteError(f'{what}: features of video {int(self.video[item])} (0-based, CSV order) are not '
                                 f'finite ({int(bad.sum())} of {len(bad)} rows): does the checkpoint hold NaN or '
                                 f'inf weights, or an embedding file such values?')


def load_split(csv_path, task, input_size):
    """Embeddings ``[N_i, D]`` and labels of one split; bad rows are errors naming file and row.
    Returns ``(seqs, labels, random_init)``; ``random_init``: some embeddings come from a randomly
    initialised LanguageBind (their store metadata says so)."""
    rows = read_csv(csv_path, label_required=True)
    seqs, labels = [], []
    for r in rows:
        y = r['label']
        where = f'{csv_path} row {r["row"]} (video {r["video_id"]})'
        if not math.isfinite(y) or (task.regression and abs(y) >= _MAX_LABEL):
            raise NonFiniteError(f'{where}: label {y:g} is not a finite number whose square is finite in float32 '
                                 f'(task {task.name})')
        if not task.regression and (y != int(y) or not 0 <= y < task.num_classes):
            raise EmbeddingError(f'{where}: label {y:g} is not a class id in [0, {task.num_classes}) '
                                 f'of task {task.name}')
        seqs.append(load_row(r, input_size, csv_path))
        input_size = seqs[-1].shape[1]
        labels.append(y)
    labels = torch.tensor(labels, dtype=torch.float32 if task.regression else torch.long)
    random_init = any(read_metadata(r['source']).get('random_init') == '1'
                      for r in rows if isinstance(r['source'], str))
    return seqs, labels, random_init


def has_embeddings(csv_path):
    """False when the CSV is missing, has no rows (step 4 writes its header alone when no video of the
    split has embeddings) or none of its rows' embedding files exists."""
    if not os.path.isfile(csv_path):
        return False
    try:
        rows = read_csv(csv_path, allow_empty=True)
    except EmbeddingError:
        return True  # a broken CSV is reported by load_split
    exists = lambda s: all(map(os.path.isfile, s)) if isinstance(s, list) else os.path.isfile(s)
    return any(exists(r['source']) for r in rows)
