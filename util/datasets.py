"""Pretraining data: random windows of segment embeddings, with the masking noise of each sample.

All randomness of a sample comes from a generator seeded by (seed, epoch, index), so a sample does
not depend on the number of workers or ranks, and a resumed run sees the same data as an
uninterrupted one. The rules (as the original release; see docs/PRETRAIN.md):
  - a video whose whole length keeps no visible token (``int(N * (1 - mask_ratio)) < 1``) is replaced
    by another video drawn from the sample's generator;
  - the window is ``randint(10, num_patches * 5) // 5`` consecutive segments (2 to num_patches) from a
    random start, the whole video if it is shorter;
  - a window of a very short video is tiled (fewer than 2 segments 8 times, fewer than 5 three times)
    and cut to ``num_patches``.
Only the window's rows are read from a store file (a memory-mapped slice) and normalised; the result is
the same as loading the whole video and slicing it.
"""
import json
import os

import numpy as np
import torch

from util.embeddings import EmbeddingError, _check, load_legacy_segments, load_row, read_csv


def tile_short(x, video_segments):
    """Repeat the window of a very short video so that some tokens stay visible: videos of fewer than
    2 segments 8 times, of fewer than 5 segments 3 times (as the original release)."""
    if video_segments < 2:
        return x.repeat(8, 1)
    if video_segments < 5:
        return x.repeat(3, 1)
    return x


STORE_DTYPES = {'F16': torch.float16, 'BF16': torch.bfloat16, 'F32': torch.float32, 'F64': torch.float64}


def read_store_header(f, path):
    """``(dtype, shape, first byte)`` of the ``embeddings`` tensor of an open safetensors store file.
    The format: an 8-byte little-endian header size, a JSON header giving each tensor's dtype, shape and
    byte range (counted from the end of the header), then the data, little-endian and row-major."""
    head = f.read(8)
    if len(head) < 8:
        raise ValueError('file shorter than a safetensors header')
    n = int.from_bytes(head, 'little')
    if n > 100_000_000:
        raise ValueError(f'header size {n} is not plausible')
    header = json.loads(f.read(n))
    if 'embeddings' not in header:
        raise KeyError('embeddings')
    info = header['embeddings']
    if info['dtype'] not in STORE_DTYPES:
        raise ValueError(f'unsupported dtype {info["dtype"]}')
    return STORE_DTYPES[info['dtype']], tuple(info['shape']), 8 + n + int(info['data_offsets'][0])


class VideoRows:
    """One CSV row's video, opened for reading a range of its segments: ``len(v)`` is its number of
    segments (from the store file's header, or the length of a legacy ``segment_paths`` list) and
    ``v.read(start, stop)`` the float32 unit-norm rows ``[stop - start, D]``, equal to
    ``load_row(row)[start:stop]``; only those rows are read from the file. Use as a context manager;
    errors name the CSV row."""

    def __init__(self, row, input_size=None, csv_path=None):
        self.row, self.input_size, self.csv_path = row, input_size, csv_path
        self._file = None
        source = row['source']
        if isinstance(source, list):
            self.n = len(source)
            if self.n == 0:
                raise self._error('empty segment_paths list')
            return
        try:
            self._file = open(source, 'rb')
            self.dtype, shape, self.offset = read_store_header(self._file, source)
        except FileNotFoundError:
            raise self._error(f'{source}: embedding file not found') from None
        except KeyError:
            self.close()
            raise self._error(f'{source}: no "embeddings" tensor in file') from None
        except (OSError, ValueError, TypeError, IndexError) as e:
            self.close()
            raise self._error(f'{source}: unreadable embedding file ({e})') from None
        if len(shape) != 2 or shape[0] == 0:
            self.close()
            raise self._error(f'{source}: expected a [N, D] array with N >= 1, got shape {shape}')
        if input_size is not None and shape[1] != input_size:
            self.close()
            raise self._error(f'{source}: embedding size {shape[1]} does not match --input_size {input_size}')
        self.n, self.dim = shape

    def _error(self, message):
        where = f'{self.csv_path} row {self.row["row"]} (video {self.row["video_id"]}): ' if self.csv_path else ''
        return EmbeddingError(where + message)

    def __len__(self):
        return self.n

    def read(self, start, stop):
        source = self.row['source']
        if self._file is None:
            try:
                return load_legacy_segments(source[start:stop], self.input_size)
            except EmbeddingError as e:
                raise self._error(str(e)) from None
        row_bytes = self.dim * self.dtype.itemsize
        size = (stop - start) * row_bytes
        data = bytearray(size)
        got = os.preadv(self._file.fileno(), [data], self.offset + start * row_bytes) if size else 0
        if got != size:
            raise self._error(f'{source}: unreadable embedding file (truncated: rows {start}-{stop} missing)')
        emb = torch.frombuffer(data, dtype=self.dtype).view(stop - start, self.dim).float()
        # F.normalize(emb, dim=-1), written out so that the norms also serve the check: a NaN/inf value
        # makes its row's norm NaN/inf, an all-zero row has norm 0; only then run the full check
        norm = emb.norm(2, -1, keepdim=True)
        lo, hi = (float(v) for v in torch.aminmax(norm))
        if not (lo > 0 and hi < float('inf')):   # also when NaN
            try:
                _check(emb, source, self.input_size)
            except EmbeddingError as e:
                raise self._error(str(e)) from None
        return emb.div_(norm.clamp_min_(1e-12))

    def close(self):
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class PretrainDataset(torch.utils.data.Dataset):
    """Videos of one or more dataset CSVs; item ``i`` is ``(x [L, D], noise [L])``.

    train=True: a random window (see the module's docstring), a new one every epoch (``set_epoch``).
    train=False (validation): the first ``num_patches`` segments (tiled as in training when the video
    is very short) and a fixed noise per video, so the masks are the same at every evaluation.
    A video that keeps no visible token over its whole length is replaced by another one drawn from
    the sample's generator, in both modes.
    """

    def __init__(self, csv_paths, input_size, num_patches, mask_ratio, seed=0, train=True, skip_bad=False,
                 log=print):
        if isinstance(csv_paths, str):
            csv_paths = [csv_paths]
        self.rows = [(csv, row) for csv in csv_paths for row in read_csv(csv)]
        self.input_size, self.num_patches, self.mask_ratio = input_size, num_patches, mask_ratio
        self.seed, self.train, self.epoch = seed, train, 0
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

    def _window(self, n_video, rng):
        """``(start, stop)`` of the segments this sample reads from a video of ``n_video`` segments."""
        if not self.train:
            return 0, min(n_video, self.num_patches)
        # as released: randint(10, num_patches * 5) // 5 segments (Python's randint includes both ends)
        n = int(rng.integers(10, self.num_patches * 5, endpoint=True)) // 5
        if n_video <= n:
            return 0, n_video
        start = int(rng.integers(0, n_video - n + 1))
        return start, start + n

    def __getitem__(self, index):
        key = [self.seed, self.epoch, index] if self.train else [self.seed, index]
        rng = np.random.default_rng(key)
        for _ in range(100):
            csv, row = self.rows[index]
            with VideoRows(row, self.input_size, csv) as video:
                if int(len(video) * (1 - self.mask_ratio)) >= 1:
                    start, stop = self._window(len(video), rng)
                    x = tile_short(video.read(start, stop), len(video))[:self.num_patches]
                    return x, torch.from_numpy(rng.random(x.shape[0])).float()
            index = int(rng.integers(len(self.rows)))
        raise EmbeddingError(f'no video keeps a visible token at --mask_ratio {self.mask_ratio} after 100 draws')


def collate_pretrain(batch, multiple=1, max_len=None):
    """Pad to the longest sequence of the batch, rounded up to a multiple of ``multiple`` (but not past
    ``max_len``, the model's ``num_patches``): ``x [B, L, D]``
    (zeros past each length), ``lengths [B]``, ``noise [B, L]`` (1 past each length, above every real
    value, so padding is never chosen to be kept)."""
    xs, noises = zip(*batch)
    lengths = torch.tensor([x.shape[0] for x in xs], dtype=torch.long)
    L = max(min(-(-int(lengths.max()) // multiple) * multiple, max_len or float('inf')), int(lengths.max()))
    shape = (len(xs), L, xs[0].shape[1])
    if torch.utils.data.get_worker_info() is not None:
        # in a DataLoader worker, build the batch in shared memory (as default_collate does): otherwise
        # it is copied there once more to reach the main process
        x = xs[0].new(xs[0]._typed_storage()._new_shared(shape[0] * shape[1] * shape[2])).view(shape)
    else:
        x = torch.empty(shape, dtype=xs[0].dtype)
    noise = torch.ones(len(xs), L)
    for i, (xi, nz) in enumerate(batch):
        x[i, :xi.shape[0]] = xi
        x[i, xi.shape[0]:] = 0
        noise[i, :nz.shape[0]] = nz
    return x, lengths, noise
