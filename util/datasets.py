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
The dataset builds whole batches (``__getitems__``, which a DataLoader calls): only the window's rows
are read from a store file, straight into the sample's slot of the padded batch, and normalised there;
the result is the same as loading the whole video, slicing it and padding the samples.
"""
import json
import math
import os

import numpy as np
import torch

from util.embeddings import EmbeddingError, _check, load_legacy_segments, load_row, read_csv


def tile_count(video_segments):
    """How many times the window of a video of ``video_segments`` segments is repeated: 8 below 2
    segments, 3 below 5, else once (as the original release), so that some tokens stay visible."""
    return 8 if video_segments < 2 else 3 if video_segments < 5 else 1


def tile_short(x, video_segments):
    """The window ``x`` of a very short video repeated ``tile_count(video_segments)`` times."""
    reps = tile_count(video_segments)
    return x.repeat(reps, 1) if reps > 1 else x


STORE_DTYPES = {'F16': torch.float16, 'BF16': torch.bfloat16, 'F32': torch.float32, 'F64': torch.float64}


def read_store_header(fd):
    """``(dtype, shape, first byte)`` of the ``embeddings`` tensor of a safetensors store file open as
    ``fd``. The format: an 8-byte little-endian header size, a JSON header giving each tensor's dtype,
    shape and byte range (counted from the end of the header), then the data, little-endian and row-major."""
    head = os.pread(fd, 8, 0)
    if len(head) < 8:
        raise ValueError('file shorter than a safetensors header')
    n = int.from_bytes(head, 'little')
    if n > 100_000_000:
        raise ValueError(f'header size {n} is not plausible')
    header = json.loads(os.pread(fd, n, 8))
    if 'embeddings' not in header:
        raise KeyError('embeddings')
    info = header['embeddings']
    if info['dtype'] not in STORE_DTYPES:
        raise ValueError(f'unsupported dtype {info["dtype"]}')
    dtype, shape, (begin, end) = STORE_DTYPES[info['dtype']], info['shape'], info['data_offsets']
    if not (all(type(v) is int and v >= 0 for v in (*shape, begin, end))
            and end - begin == math.prod(shape) * dtype.itemsize):
        raise ValueError(f'"embeddings" of shape {shape} and dtype {info["dtype"]} does not fit its byte range '
                         f'{info["data_offsets"]}')
    return dtype, tuple(shape), 8 + n + begin


class VideoRows:
    """One CSV row's video, opened for reading a range of its segments: ``len(v)`` is its number of
    segments (from the store file's header, or the length of a legacy ``segment_paths`` list) and
    ``v.read(start, stop)`` the float32 unit-norm rows ``[stop - start, D]``, equal to
    ``load_row(row)[start:stop]``; only those rows are read from the file. In two steps:
    ``v.finish(v.read_raw(start, stop), out)``, where ``read_raw`` only reads (the file can then be
    closed) and ``finish`` converts and normalises into ``out`` (float32, ``[stop - start, D]``, rows
    contiguous: e.g. a sample's slot of a batch; None: a new tensor) and returns it. Use as a context
    manager; errors name the CSV row."""

    def __init__(self, row, input_size=None, csv_path=None):
        self.row, self.input_size, self.csv_path = row, input_size, csv_path
        self._fd = None
        source = row['source']
        self.legacy = isinstance(source, list)
        if self.legacy:
            self.n = len(source)
            if self.n == 0:
                raise self._error('empty segment_paths list')
            return
        try:
            self._fd = os.open(source, os.O_RDONLY)
            self.dtype, shape, self.offset = read_store_header(self._fd)
        except FileNotFoundError:
            raise self._error(f'{source}: embedding file not found') from None
        except KeyError:
            self.close()
            raise self._error(f'{source}: no "embeddings" tensor in file') from None
        except (OSError, ValueError, TypeError, IndexError, RecursionError) as e:
            self.close()
            raise self._error(f'{source}: unreadable embedding file ({e})') from None
        except BaseException:   # the file is open: a bare descriptor, which nothing else would close
            self.close()
            raise
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

    def read(self, start, stop, out=None):
        return self.finish(self.read_raw(start, stop), out)

    def read_raw(self, start, stop):
        """Rows ``start:stop`` as stored (float16 by default); in the legacy layout the finished rows."""
        source = self.row['source']
        if self.legacy:
            try:
                return load_legacy_segments(source[start:stop], self.input_size)
            except EmbeddingError as e:
                raise self._error(str(e)) from None
        rows = torch.empty((stop - start, self.dim), dtype=self.dtype)
        size, row_bytes = rows.nbytes, self.dim * rows.element_size()
        try:
            got = os.preadv(self._fd, [rows.view(torch.uint8).numpy()], self.offset + start * row_bytes) if size else 0
        except OSError as e:
            raise self._error(f'{source}: unreadable embedding file ({e})') from None
        if got != size:
            raise self._error(f'{source}: unreadable embedding file (truncated: rows {start}-{stop} missing)')
        return rows

    def finish(self, rows, out=None):
        """``rows`` of ``read_raw`` as float32 unit-norm rows, written into ``out`` if given."""
        if self.legacy:
            return rows if out is None else out.copy_(rows)
        emb = rows.float() if out is None else out.copy_(rows)
        # F.normalize(emb, dim=-1), written out so that the norms also serve the check: a NaN/inf value
        # makes its row's norm NaN/inf, an all-zero row has norm 0; only then run the full check
        norm = torch.linalg.vector_norm(emb, dim=-1, keepdim=True)
        lo, hi = (float(v) for v in torch.aminmax(norm))
        if not (lo > 0 and hi < float('inf')):   # also when NaN
            try:
                _check(emb, self.row['source'], self.input_size)
            except EmbeddingError as e:
                raise self._error(str(e)) from None
        return emb.div_(norm.clamp_min_(1e-12))

    def close(self):
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def empty_batch(shape):
    """``torch.empty(shape)`` (float32); in a DataLoader worker in shared memory (as default_collate
    does), so that the batch is not copied once more to reach the main process."""
    if torch.utils.data.get_worker_info() is None:
        return torch.empty(shape)
    return torch.empty(0).new(torch.empty(0)._typed_storage()._new_shared(math.prod(shape))).view(shape)


def collate_built(batch):
    """The DataLoader's ``collate_fn`` for a PretrainDataset: its ``__getitems__`` returns the batch
    already built."""
    return batch


class PretrainDataset(torch.utils.data.Dataset):
    """Videos of one or more dataset CSVs, read in batches: ``__getitems__(indices)`` is the padded
    batch ``(x [B, L, D], lengths [B], noise [B, L])`` of samples ``indices`` (a DataLoader calls it;
    give it ``collate_fn=collate_built``) and ``ds[i]`` is sample ``i`` alone, ``(x [L_i, D], noise [L_i])``.

    train=True: a random window (see the module's docstring), a new one every epoch (``set_epoch``).
    train=False (validation): the first ``num_patches`` segments (tiled as in training when the video
    is very short) and a fixed noise per video, so the masks are the same at every evaluation.
    A video that keeps no visible token over its whole length is replaced by another one drawn from
    the sample's generator, in both modes. Every file must hold ``input_size``-d rows;
    ``pad_multiple``: see ``__getitems__``.
    """

    def __init__(self, csv_paths, input_size, num_patches, mask_ratio, seed=0, train=True, skip_bad=False,
                 pad_multiple=1, log=print):
        if isinstance(csv_paths, str):
            csv_paths = [csv_paths]
        self.rows = [(csv, row) for csv in csv_paths for row in read_csv(csv)]
        self.input_size, self.num_patches, self.mask_ratio = input_size, num_patches, mask_ratio
        self.seed, self.train, self.epoch, self.pad_multiple = seed, train, 0, pad_multiple
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

    def _draw(self, index):
        """Sample ``index``'s video (closed again), the window's rows as read (``VideoRows.read_raw``) and
        the noise: ``(video, rows, length, noise)``, ``length`` the sample's number of rows (the window
        tiled and cut to num_patches), ``noise`` float64 numpy ``[length]``."""
        rng = np.random.default_rng([self.seed, self.epoch, index] if self.train else [self.seed, index])
        for _ in range(100):
            csv, row = self.rows[index]
            with VideoRows(row, self.input_size, csv) as video:
                if int(len(video) * (1 - self.mask_ratio)) >= 1:
                    start, stop = self._window(len(video), rng)
                    length = min((stop - start) * tile_count(len(video)), self.num_patches)
                    return video, video.read_raw(start, stop), length, rng.random(length)
            index = int(rng.integers(len(self.rows)))
        raise EmbeddingError(f'no video keeps a visible token at --mask_ratio {self.mask_ratio} after 100 draws')

    def __getitems__(self, indices):
        """The batch of samples ``indices``, each read straight into its slot: ``x [B, L, D]`` (float32,
        zeros past each length), ``lengths [B]``, ``noise [B, L]`` (1 past each length, above every real
        value, so padding is never chosen to be kept); ``L`` is the longest sample rounded up to a
        multiple of ``pad_multiple``, but not past ``num_patches``. ``x[i, :lengths[i]]`` and
        ``noise[i, :lengths[i]]`` are ``self[indices[i]]``. In a DataLoader worker ``x`` and ``noise``
        are in shared memory. Each file is open only while its window is read."""
        samples = [self._draw(int(i)) for i in indices]
        lengths = torch.tensor([s[2] for s in samples], dtype=torch.long)
        m = self.pad_multiple
        L = min(-(-int(lengths.max()) // m) * m, self.num_patches)   # every length is <= num_patches
        x = empty_batch((len(samples), L, self.input_size))
        noise = empty_batch((len(samples), L)).fill_(1)
        for i, (video, rows, n, nz) in enumerate(samples):
            if n == len(rows):
                video.finish(rows, x[i, :n])
            else:   # a very short video, tiled (a few rows)
                x[i, :n] = tile_short(video.finish(rows), len(video))[:n]
            x[i, n:].zero_()
            noise[i, :n] = torch.from_numpy(nz)
        return x, lengths, noise

    def __getitem__(self, index):
        x, lengths, noise = self.__getitems__([index])
        n = int(lengths[0])
        return x[0, :n], noise[0, :n]
