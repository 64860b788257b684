"""Convert the original release's per-segment files (<root>/<video_id>/<start>-<end>/langbind_output.pt)
into the per-video store (<embedding_dir>/<video_id>.safetensors).

  python tools/convert_legacy_embeddings.py --legacy_root R --embedding_dir E [--dtype fp16|fp32]

Videos already converted (store file loads and has as many segments) are skipped, so a rerun only does
what is left, and temporary files of a killed run are removed; a video with an unreadable segment file
is reported and skipped (exit status 1 when any was skipped; 2 for bad input such as a missing
--legacy_root). A video whose segments do not follow each other (a segment missing, or two of one
window) is converted as found, with its times, and named in a note.
"""
import argparse
import os
import sys

import numpy as np

from util.embeddings import (EmbeddingError, embedding_path, load_legacy_segments, load_video_embeddings,
                             save_video_embeddings)
from util.errors import run_main
from util.fileio import remove_stale_temporaries
from util.legacy import legacy_videos

DTYPES = {'fp16': np.float16, 'fp32': np.float32}


def get_args_parser():
    p = argparse.ArgumentParser(description='Convert legacy per-segment embeddings to the per-video store')
    p.add_argument('--legacy_root', required=True, help='folder of <video_id>/<start>-<end>/langbind_output.pt')
    p.add_argument('--embedding_dir', required=True, help='store folder written: <video_id>.safetensors')
    p.add_argument('--dtype', choices=list(DTYPES), default='fp16', help='stored precision')
    return p


def is_converted(path, num_segments):
    try:
        return load_video_embeddings(path).shape[0] == num_segments
    except EmbeddingError:
        return False


def main(args):
    """Returns ``{video_id: reason}`` for the videos that could not be converted."""
    if not os.path.isdir(args.legacy_root):
        raise EmbeddingError(f'{args.legacy_root}: legacy folder not found')
    try:
        os.makedirs(args.embedding_dir, exist_ok=True)
    except OSError as e:
        raise EmbeddingError(f'{args.embedding_dir}: cannot create the store folder ({e.strerror or e})') from None
    videos = legacy_videos(args.legacy_root)
    remove_stale_temporaries([embedding_path(args.embedding_dir, vid) for vid in videos])
    converted, skipped, bad, gaps = 0, 0, {}, 0
    for vid, paths in videos.items():
        out = embedding_path(args.embedding_dir, vid)
        if os.path.isfile(out) and is_converted(out, len(paths)):
            skipped += 1
            continue
        try:
            emb, starts, ends = load_legacy_segments(paths, with_times=True)
        except EmbeddingError as e:
            bad[vid] = str(e)
            print(f'skipped {vid}: {e}')
            continue
        breaks = [f'{e:g} s -> {s:g} s' for e, s in zip(ends[:-1].tolist(), starts[1:].tolist())
                  if abs(s - e) > 1e-6]
        if breaks:
            gaps += 1
            print(f'note: {vid}: segments not back to back at {", ".join(breaks[:5])}'
                  f'{" ..." if len(breaks) > 5 else ""} (a segment missing, or two of one window); converted as found')
        try:
            save_video_embeddings(out, emb, starts, ends, dtype=DTYPES[args.dtype],
                                  metadata={'video_id': vid, 'source': 'legacy langbind_output.pt',
                                            'legacy_root': os.path.abspath(args.legacy_root)})
        except OSError as e:   # the folder is writable: a full disk or the like, which every video would meet
            raise EmbeddingError(f'{out}: cannot write the store file ({e.strerror or e})') from None
        converted += 1
    print(f'{len(videos)} videos: {converted} converted ({gaps} with segments not back to back), {skipped} '
          f'already converted, {len(bad)} bad')
    return bad


if __name__ == '__main__':
    sys.exit(1 if run_main(main, get_args_parser().parse_args()) else 0)
