"""Building step 4's dataset CSVs: finding each video's embeddings in the stores (or the original
release's per-segment files), keeping one encoder per dataset, leaving out listed videos, writing the CSV."""
import os

import pandas as pd
from safetensors import SafetensorError, safe_open

from util.embeddings import EmbeddingError, embedding_path, same_encoder
from util.fileio import atomic_write
from util.legacy import legacy_segment_paths

LOCATIONS = ('embedding_path', 'segment_paths')


def store_header(path):
    """``(number of segments, metadata dict)`` of a store file, from its header only."""
    try:
        with safe_open(path, framework='numpy') as f:
            shape = f.get_slice('embeddings').get_shape()
            metadata = dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError, KeyError) as e:
        raise EmbeddingError(f'{path}: unreadable embedding file ({e})') from None
    if len(shape) != 2 or shape[0] == 0:
        raise EmbeddingError(f'{path}: expected [N, D] embeddings with N >= 1, got shape {shape}')
    return shape[0], metadata


def find_embeddings(video_id, embedding_dirs, legacy_roots=()):
    """``(CSV fields, metadata, None)`` for a video with embeddings (first folder that has it), else
    ``(None, None, reason)``. Legacy per-segment files have no metadata (``{}``)."""
    for d in embedding_dirs:
        p = embedding_path(d, video_id)
        if os.path.isfile(p):
            try:
                n, metadata = store_header(p)
            except EmbeddingError as e:
                return None, None, str(e)
            return {'embedding_path': os.path.abspath(p), 'number_of_segments': n}, metadata, None
    for root in legacy_roots:
        paths = legacy_segment_paths(root, video_id)
        if paths:
            return {'segment_paths': repr([os.path.abspath(p) for p in paths]),
                    'number_of_segments': len(paths)}, {}, None
    return None, None, 'no embeddings'


class EncoderCheck:
    """Every store file of one dataset must come from one encoder: the same ``model`` metadata (by
    ``util.embeddings.same_encoder``; files without it, such as converted legacy files, are not compared) and the same
    ``random_init`` (absent = real weights). ``add`` raises ``EmbeddingError`` naming two files that differ."""

    def __init__(self):
        self.model = None         # (model, path) of the first file that names its model
        self.random = None        # (random_init, path) of the first file

    def add(self, path, metadata):
        model, random_init = metadata.get('model'), metadata.get('random_init', '0') == '1'
        if model is not None:
            if self.model is None:
                self.model = (model, path)
            elif not same_encoder(model, self.model[0]):
                raise EmbeddingError(f'{self.model[1]} (model {self.model[0]!r}) and {path} (model {model!r}) '
                                     f'come from different encoders; one dataset must use one encoder '
                                     f'(re-extract the odd ones, or keep them in another store)')
        if self.random is None:
            self.random = (random_init, path)
        elif random_init != self.random[0]:
            (rnd, real) = (path, self.random[1]) if random_init else (self.random[1], path)
            raise EmbeddingError(f'{rnd} comes from a randomly initialised encoder (random_init=1) and {real} '
                                 f'from real weights; one dataset must not mix them')


def excluded_ids(csv_paths):
    """``{video_id: CSV that lists it}`` over the ``video_id`` column of each CSV (first CSV kept)."""
    out = {}
    for c in csv_paths:
        if not os.path.isfile(c):
            raise EmbeddingError(f'{c}: --exclude_csv file not found')
        try:
            df = pd.read_csv(c, dtype=str, keep_default_na=False)
        except pd.errors.EmptyDataError:
            raise EmbeddingError(f'{c}: empty CSV file') from None
        except (pd.errors.ParserError, UnicodeDecodeError) as e:
            raise EmbeddingError(f'{c}: unreadable CSV ({e})') from None
        if 'video_id' not in df.columns:
            raise EmbeddingError(f'{c}: --exclude_csv needs a "video_id" column, has {list(df.columns)}')
        for vid in df['video_id']:
            out.setdefault(vid, c)
    return out


def write_csv(path, records, extra_columns=()):
    """Atomic CSV with video_id, the location column(s) used, number_of_segments, then extra_columns."""
    locations = [c for c in LOCATIONS if any(c in r for r in records)] or ['embedding_path']
    df = pd.DataFrame(records, columns=['video_id'] + locations + ['number_of_segments'] + list(extra_columns))
    df[locations] = df[locations].fillna('')
    atomic_write(path, lambda tmp: df.to_csv(tmp, index=False))
