"""Segment-embedding store and the dataset CSVs that point into it.

Store (one file per video, see docs/DATA.md): ``<embedding_dir>/<video_id>.safetensors`` with
  - ``embeddings``: ``[N, D]`` float16 or float32, unit-norm rows, one per segment in time order
  - ``starts``, ``ends``: ``[N]`` float64, each segment's window in seconds
  - string metadata (``video_id``, ``model``, ``random_init`` = "1" for randomly initialised encoders, ...)
Files are written atomically (temporary file in the same folder, then ``os.replace``).

The original release's layout is also read: one ``langbind_output.pt`` per segment holding
``{'embedding': Tensor[D], 'start': int, 'end': int}``, listed by a ``segment_paths`` CSV column (read in
the time order of the files' ``<start>-<end>`` folders).

Dataset CSV: one row per video with ``video_id``, ``embedding_path`` (or ``segment_paths``),
``number_of_segments`` and, for labelled data, ``label`` and ``label_name``. Relative paths are
resolved against the CSV's folder.
"""
import ast
import csv
import json
import os

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.numpy import save
from safetensors.torch import load_file
from safetensors import safe_open

from util.checkpoint import load_error_reason
from util.errors import InputError
from util.fileio import atomic_write
from util.legacy import in_time_order

EXTENSION = '.safetensors'


class EmbeddingError(InputError, ValueError):
    """Bad embedding file or CSV row; the message names the file (and the CSV row)."""


def embedding_path(embedding_dir, video_id):
    return os.path.join(embedding_dir, video_id + EXTENSION)


def save_video_embeddings(path, embeddings, starts, ends, metadata=None, dtype=np.float16):
    """Write one video's ``[N, D]`` segment embeddings (L2-normalised here) atomically."""
    emb = torch.as_tensor(embeddings).float()
    emb = F.normalize(emb, dim=-1).numpy().astype(dtype)
    tensors = {
        'embeddings': np.ascontiguousarray(emb),
        'starts': np.asarray(starts, dtype=np.float64),
        'ends': np.asarray(ends, dtype=np.float64),
    }
    if not (len(tensors['starts']) == len(tensors['ends']) == emb.shape[0]):
        raise ValueError(f'{path}: {emb.shape[0]} embeddings but {len(tensors["starts"])} starts / '
                         f'{len(tensors["ends"])} ends')
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    atomic_write(path, lambda tmp: _save_sorted(tensors, tmp, meta))


def _save_sorted(tensors, path, metadata):
    """``safetensors`` save with the header's keys sorted: safetensors orders the metadata differently
    on each call, so without this equal inputs would not give byte-identical files."""
    data = save(tensors, metadata=metadata)
    n = int.from_bytes(data[:8], 'little')
    header = json.dumps(json.loads(data[8:8 + n]), sort_keys=True, separators=(',', ':'), ensure_ascii=False).encode()
    with open(path, 'wb') as f:
        f.write(data[:8] + (header.ljust(n) if len(header) <= n else data[8:8 + n]) + data[8 + n:])


def read_metadata(path):
    """String metadata of a store file (empty dict if none)."""
    with safe_open(path, framework='numpy') as f:
        return dict(f.metadata() or {})


def same_encoder(recorded, model):
    """Whether a store file's ``model`` metadata names the encoder ``model``: a hub name or a local
    checkpoint folder compares by its last path component (the same checkpoint typed as a relative or
    an absolute path, or as its hub name, is one encoder); random encoders by their full name."""
    def name(m):
        return os.path.basename(os.path.normpath(str(m))) if m is not None else None
    return name(recorded) == name(model)


def encoder_name(model, random_init):
    """An encoder as messages name it: its ``model`` metadata, ``(random weights)`` when ``random_init``."""
    return f'{model or "an unknown encoder"}' + (' (random weights)' if random_init in (True, '1') else '')


def store_encoder(path):
    """``(model, random_init)`` from a store file's metadata (``None`` where a key is missing);
    raises ``EmbeddingError`` for an unreadable file."""
    try:
        meta = read_metadata(path)
    except (SafetensorError, OSError, ValueError) as e:
        raise EmbeddingError(f'{path}: unreadable embedding file ({e})') from None
    return meta.get('model'), meta.get('random_init')


def video_bytes(video_path):
    """The size of the video file, as step 3 records it in the store's ``video_bytes`` metadata
    (None when the file is not there, e.g. only its ``--reencode`` segment files are)."""
    return str(os.path.getsize(video_path)) if video_path and os.path.isfile(video_path) else None


def video_changed(path, video_path):
    """Whether the store file at ``path`` was written from a video file of another size than
    ``video_path`` has now (replaced since; False when either size is unknown, as in files written
    before step 3 recorded it)."""
    try:
        recorded = read_metadata(path).get('video_bytes')
    except (SafetensorError, OSError, ValueError):
        return False
    now = video_bytes(video_path)
    return recorded is not None and now is not None and recorded != now


def is_complete(path, segments, model=None, random_init=None, video_path=None):
    """True when the store file at ``path`` loads and holds one embedding per segment with the same
    start and end times (``segments``: dicts with ``start`` and ``end``). With ``model`` given, the
    file must also have been written by that encoder: its ``model`` metadata names the same checkpoint
    (``same_encoder``) and its ``random_init`` flag equals ``random_init`` (true for random weights).
    With ``video_path`` given, the video must not have changed since (``video_changed``)."""
    if not os.path.isfile(path):
        return False
    try:
        emb, starts, ends = load_video_embeddings(path, with_times=True)
        recorded, rand = store_encoder(path) if model is not None else (None, None)
    except EmbeddingError:
        return False
    if model is not None and not (same_encoder(recorded, model) and rand == ('1' if random_init else '0')):
        return False
    if video_changed(path, video_path):
        return False
    return (emb.shape[0] == len(segments)
            and np.allclose(starts.numpy(), [s['start'] for s in segments], rtol=0, atol=1e-6)
            and np.allclose(ends.numpy(), [s['end'] for s in segments], rtol=0, atol=1e-6))


def _check(emb, path, input_size=None):
    if emb.ndim != 2 or emb.shape[0] == 0:
        raise EmbeddingError(f'{path}: expected a [N, D] array with N >= 1, got shape {tuple(emb.shape)}')
    if input_size is not None and emb.shape[1] != input_size:
        raise EmbeddingError(f'{path}: embedding size {emb.shape[1]} does not match --input_size {input_size}')
    if not torch.isfinite(emb).all():
        bad = (~torch.isfinite(emb)).any(dim=1).nonzero()[0].item()
        raise EmbeddingError(f'{path}: non-finite value (NaN/inf) in segment {bad}')
    if (emb.norm(dim=-1) == 0).any():
        bad = (emb.norm(dim=-1) == 0).nonzero()[0].item()
        raise EmbeddingError(f'{path}: all-zero embedding in segment {bad}')


def load_video_embeddings(path, input_size=None, with_times=False):
    """Load ``[N, D]`` float32 unit-norm embeddings from a store file; errors name the file."""
    try:
        arrays = load_file(path)
    except FileNotFoundError:
        raise EmbeddingError(f'{path}: embedding file not found') from None
    except (SafetensorError, OSError, ValueError) as e:
        raise EmbeddingError(f'{path}: unreadable embedding file ({e})') from None
    if 'embeddings' not in arrays:
        raise EmbeddingError(f'{path}: no "embeddings" tensor in file')
    emb = arrays['embeddings'].float()
    _check(emb, path, input_size)
    emb = F.normalize(emb, dim=-1)
    if with_times:
        return emb, arrays['starts'], arrays['ends']
    return emb


def load_legacy_segments(paths, input_size=None, with_times=False):
    """Original release layout: one ``{'embedding', 'start', 'end'}`` .pt per segment."""
    embs, starts, ends = [], [], []
    for p in paths:
        try:
            d = torch.load(p, map_location='cpu', weights_only=True)
            emb = torch.as_tensor(d['embedding'])
            if emb.squeeze().ndim != 1:
                raise ValueError(f'embedding of shape {tuple(emb.shape)}, expected one vector [D]')
            embs.append(emb.float().reshape(-1))
            starts.append(float(d.get('start', len(starts))))
            ends.append(float(d.get('end', len(ends) + 1)))
        except FileNotFoundError:
            raise EmbeddingError(f'{p}: segment embedding file not found') from None
        except Exception as e:  # unpickling errors, missing key, bad tensor
            raise EmbeddingError(f'{p}: unreadable segment embedding file ({type(e).__name__}: '
                                 f'{load_error_reason(e)})') from None
    if not embs:
        raise EmbeddingError('empty segment_paths list')
    try:
        emb = torch.stack(embs)
    except RuntimeError:
        raise EmbeddingError(f'{paths[0]}: segments of different sizes in one video') from None
    _check(emb, paths[0], input_size)
    emb = F.normalize(emb, dim=-1)
    if with_times:
        return emb, torch.tensor(starts, dtype=torch.float64), torch.tensor(ends, dtype=torch.float64)
    return emb


def _check_field_counts(csv_path):
    """Every data row must have as many fields as the header. (pandas takes a first row with one field
    too many as an index column and shifts every column, which then looks like an empty embedding_path.)"""
    try:
        with open(csv_path, newline='', encoding='utf-8-sig') as f:
            reader = csv.reader(f)
            header = next(reader, None)
            if header is None:
                return
            row = 0
            for fields in reader:
                if not fields:    # blank lines are skipped, as pandas does
                    continue
                row += 1
                if len(fields) != len(header):
                    raise EmbeddingError(f'{csv_path} row {row} (line {reader.line_num}): {len(fields)} fields, '
                                         f'but the header has {len(header)} ({",".join(header)})')
    except (UnicodeDecodeError, csv.Error) as e:
        raise EmbeddingError(f'{csv_path}: unreadable CSV ({e})') from None


def read_csv(csv_path, label_required=False, allow_empty=False):
    """Read a dataset CSV into a list of row dicts with resolved paths.

    Each dict has ``video_id``, ``row`` (1-based data row, the header is row 0), ``source`` (a
    store path or a list of legacy segment paths) and, when present, ``label`` / ``label_name``.
    A CSV with a header and no rows is an error unless ``allow_empty``.
    """
    if not os.path.isfile(csv_path):
        raise EmbeddingError(f'{csv_path}: CSV file not found')
    _check_field_counts(csv_path)
    import pandas as pd  # here: step 3 imports this module and never reads a CSV (start-up)
    try:
        df = pd.read_csv(csv_path, dtype={'video_id': str, 'label_name': str}, keep_default_na=False)
    except pd.errors.EmptyDataError:
        raise EmbeddingError(f'{csv_path}: empty CSV file') from None
    except (pd.errors.ParserError, UnicodeDecodeError) as e:
        raise EmbeddingError(f'{csv_path}: unreadable CSV ({e})') from None
    if 'embedding_path' not in df.columns and 'segment_paths' not in df.columns:
        raise EmbeddingError(f'{csv_path}: needs an "embedding_path" or "segment_paths" column, '
                             f'has {list(df.columns)}')
    if label_required and 'label' not in df.columns:
        raise EmbeddingError(f'{csv_path}: needs a "label" column, has {list(df.columns)}')
    if len(df) == 0 and not allow_empty:
        raise EmbeddingError(f'{csv_path}: CSV has a header but no rows')
    base = os.path.dirname(os.path.abspath(csv_path))

    def resolve(p):
        p = os.path.expanduser(str(p))
        return p if os.path.isabs(p) else os.path.join(base, p)

    rows = []
    for i, r in enumerate(df.to_dict('records'), start=1):
        vid = str(r.get('video_id', i))
        if 'embedding_path' in df.columns and str(r['embedding_path']).strip():
            source = resolve(r['embedding_path'])
        elif 'segment_paths' in df.columns:
            try:
                paths = ast.literal_eval(str(r['segment_paths']))
                assert isinstance(paths, (list, tuple))
            except Exception:
                raise EmbeddingError(f'{csv_path} row {i}: segment_paths is not a Python list literal') from None
            source = in_time_order([resolve(p) for p in paths])
        else:
            raise EmbeddingError(f'{csv_path} row {i}: empty embedding_path')
        row = {'video_id': vid, 'row': i, 'source': source}
        if 'label' in df.columns:
            label = r['label']
            try:
                label = float(label)
            except (TypeError, ValueError):
                raise EmbeddingError(f'{csv_path} row {i}: label {label!r} is not a number') from None
            if not np.isfinite(label):
                raise EmbeddingError(f'{csv_path} row {i}: label {label!r} is not finite')
            row['label'] = label
            row['label_name'] = str(r.get('label_name', ''))
        rows.append(row)
    return rows


def load_row(row, input_size=None, csv_path=None):
    """Embeddings ``[N, D]`` of one CSV row (store file or legacy segment list); errors name the CSV row."""
    try:
        if isinstance(row['source'], list):
            return load_legacy_segments(row['source'], input_size)
        return load_video_embeddings(row['source'], input_size)
    except EmbeddingError as e:
        where = f'{csv_path} row {row["row"]} (video {row["video_id"]}): ' if csv_path else ''
        raise EmbeddingError(where + str(e)) from None


def pad_batch(seqs):
    """Pad a list of ``[L_i, D]`` tensors to the longest: returns ``x [B, L_max, D]`` (zeros past
    each length) and ``lengths [B]``."""
    lengths = torch.tensor([s.shape[0] for s in seqs], dtype=torch.long)
    x = seqs[0].new_zeros(len(seqs), int(lengths.max()), seqs[0].shape[1])
    for i, s in enumerate(seqs):
        x[i, :s.shape[0]] = s
    return x, lengths
