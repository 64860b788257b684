"""Pretraining data: random windows of segment embeddings, with the masking noise of each sample.

All randomness of a sample comes from a generator seeded by (seed, epoch, index), so a sample does
not depend on the number of workers or ranks, and a resumed run sees the same data as an
uninterrupted one. DESIGN.md section 4 gives the rules.
"""
import numpy as np
import torch

from util.embeddings import EmbeddingError, load_row, pad_batch, read_csv

MIN_WINDOW_SEC = 10.0


def tile_short(x, video_segments):
    """Repeat the window of a very short video so that some tokens stay visible: videos of fewer than
    2 segments 8 times, of fewer than 5 segments 3 times (as the original release)."""
    if video_segments < 2:
        return x.repeat(8, 1)
    if video_segments < 5:
        return x.repeat(3, 1)
    return x


class PretrainDataset(torch.utils.data.Dataset):
    """Videos of one or more dataset CSVs; item ``i`` is ``(x [L, D], noise [L])``.

    train=True: a random window (duration uniform in [10 s, num_patches * segment_sec], that many
    consecutive segments from a random start; the whole video if shorter), tiled when the video is
    very short, cut to ``num_patches``; a new window every epoch (``set_epoch``).
    train=False (validation): the first ``num_patches`` segments and a fixed noise per video, so the
    masks are the same at every evaluation.
    A sample that would keep no visible token (int(L * (1 - mask_ratio)) == 0) is replaced by
    another video drawn from the same generator.
    """

    def __init__(self, csv_paths, input_size, num_patches, mask_ratio, segment_sec=5.0, seed=0,
                 train=True, skip_bad=False, log=print):
        if isinstance(csv_paths, str):
            csv_paths = [csv_paths]
        self.rows = [(csv, row) for csv in csv_paths for row in read_csv(csv)]
        self.input_size, self.num_patches, self.mask_ratio = input_size, num_patches, mask_ratio
        self.segment_sec, self.seed, self.train, self.epoch = segment_sec, seed, train, 0
        if skip_bad:
            self.rows = self._drop_bad(log)
        if not self.rows:
            raise EmbeddingError(f'{", ".join(csv_paths)}: no usable videos')

    def _drop_bad(self, log, show=5):
        good, bad = [], []
        for csv, row in self.rows:
            try:
                load_row(row, self.input_size, csv)
                good.append((csv, row))
            except EmbeddingError as e:
                bad.append(str(e))
        if bad:
            log(f'--skip_bad: skipped {len(bad)} of {len(self.rows)} videos; first {min(show, len(bad))}:\n  '
                + '\n  '.join(bad[:show]))
        return good

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return len(self.rows)

    def _window(self, emb, rng):
        if not self.train:
            return emb[:self.num_patches]
        max_sec = self.num_patches * self.segment_sec
        n = int(np.ceil(rng.uniform(MIN_WINDOW_SEC, max_sec) / self.segment_sec))  # 2 .. num_patches
        if emb.shape[0] <= n:
            return emb
        start = int(rng.integers(0, emb.shape[0] - n + 1))
        return emb[start:start + n]

    def __getitem__(self, index):
        key = [self.seed, self.epoch, index] if self.train else [self.seed, index]
        rng = np.random.default_rng(key)
        for _ in range(100):
            csv, row = self.rows[index]
            emb = load_row(row, self.input_size, csv)
            x = tile_short(self._window(emb, rng), emb.shape[0])[:self.num_patches]
            if int(x.shape[0] * (1 - self.mask_ratio)) > 0:
                return x, torch.from_numpy(rng.random(x.shape[0])).float()
            index = int(rng.integers(len(self.rows)))
        raise EmbeddingError(f'no video keeps a visible token at --mask_ratio {self.mask_ratio} after 100 draws')


def collate_pretrain(batch):
    """Pad to the longest sequence of the batch: ``x [B, L, D]``, ``lengths [B]``, ``noise [B, L]``
    (noise is 1 past each length, above every real value, so padding is never chosen to be kept)."""
    xs, noises = zip(*batch)
    x, lengths = pad_batch(list(xs))
    noise = torch.ones(len(noises), x.shape[1])
    for i, nz in enumerate(noises):
        noise[i, :nz.shape[0]] = nz
    return x, lengths, noise
