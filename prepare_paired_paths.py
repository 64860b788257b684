"""Step 2: turn segments_metadata.csv (step 1) into the job file(s) of step 3.

One job per video: its input path, its segments and the store file step 3 writes
(``<embedding_dir>/<video_id>.safetensors``). Videos whose store file is already complete are left
out, so a rerun only does what is missing; ``--num_shards K`` splits the jobs into K files with
near-equal numbers of segments (one per machine).

    python prepare_paired_paths.py --segments_csv data/lvu_segments/segments_metadata.csv \
        --embedding_dir data/lvu_embeddings
"""
import argparse
import heapq
import json
import math
import os

import pandas as pd

from util.embeddings import (EmbeddingError, embedding_path, encoder_name, is_complete, store_encoder,
                             video_changed)
from util.errors import InputError, run_main
from util.fileio import atomic_write_text

REQUIRED_COLUMNS = ['video_id', 'video_path', 'segment_index', 'start', 'end', 'num_frames', 'fps', 'duration']
NUMBERS = {'segment_index': int, 'start': float, 'end': float, 'num_frames': int, 'fps': float, 'duration': float}


class SegmentsError(InputError, ValueError):
    """Malformed segments CSV; the message names the file (and row)."""


def get_args_parser():
    parser = argparse.ArgumentParser('Job files for langbind_preprocessing.py', add_help=True)
    parser.add_argument('--segments_csv', required=True, help='segments_metadata.csv written by step 1')
    parser.add_argument('--embedding_dir', required=True, help='folder where step 3 writes one file per video')
    parser.add_argument('--out_json', default=None,
                        help='job file (default: paired_paths.json beside the segments CSV); with '
                             '--num_shards K > 1: <stem>_<k>of<K>.json, k = 0..K-1')
    parser.add_argument('--num_shards', default=1, type=int, help='split the jobs into this many files')
    return parser


def read_segments(csv_path):
    """Jobs (without ``output_path``) from a segments CSV, sorted by video id, segments by index.
    Relative paths are resolved against the CSV's folder (as in dataset CSVs), whatever the working
    folder of step 3."""
    try:
        df = pd.read_csv(csv_path, dtype=str, keep_default_na=False)
    except FileNotFoundError:
        raise SegmentsError(f'{csv_path}: file not found') from None
    except pd.errors.EmptyDataError:
        raise SegmentsError(f'{csv_path}: empty file') from None
    except (pd.errors.ParserError, UnicodeDecodeError) as e:
        raise SegmentsError(f'{csv_path}: unreadable CSV ({e})') from None
    missing = [c for c in REQUIRED_COLUMNS if c not in df.columns]
    if missing:
        raise SegmentsError(f'{csv_path}: missing column(s) {missing}; has {list(df.columns)}')
    base = os.path.dirname(os.path.abspath(csv_path))
    resolve = lambda p: os.path.normpath(os.path.join(base, p)) if p else None
    jobs = {}
    for i, r in enumerate(df.to_dict('records'), start=1):
        where = f'{csv_path} row {i} (line {i + 1})'
        values = {}
        for col, kind in NUMBERS.items():
            try:
                values[col] = kind(r[col])
                assert math.isfinite(values[col])
            except (ValueError, AssertionError):
                raise SegmentsError(f'{where}: {col} {r[col]!r} is not a finite {kind.__name__}') from None
        if not r['video_id'] or not r['video_path']:
            raise SegmentsError(f'{where}: empty video_id or video_path')
        if values['end'] <= values['start']:
            raise SegmentsError(f'{where}: end {values["end"]} is not after start {values["start"]}')
        job = jobs.setdefault(r['video_id'], dict(
            video_id=r['video_id'], video_path=resolve(r['video_path']), fps=values['fps'],
            num_frames=values['num_frames'], duration=values['duration'], segments=[]))
        if job['video_path'] != resolve(r['video_path']):
            raise SegmentsError(f'{where}: video {r["video_id"]} listed with two paths '
                                f'({job["video_path"]} and {r["video_path"]})')
        job['segments'].append(dict(index=values['segment_index'], start=values['start'], end=values['end'],
                                    path=resolve(r.get('segment_path'))))
    for job in jobs.values():
        job['segments'].sort(key=lambda s: s['index'])
        if [s['index'] for s in job['segments']] != list(range(len(job['segments']))):
            raise SegmentsError(f'{csv_path}: video {job["video_id"]} has segment indices '
                                f'{[s["index"] for s in job["segments"]]}, expected 0..N-1 once each')
    return [jobs[v] for v in sorted(jobs)]


def shard_jobs(jobs, num_shards):
    """Split ``jobs`` into ``num_shards`` lists with near-equal segment totals (largest job first to
    the lightest shard); each shard keeps the jobs' order."""
    heap = [(0, k) for k in range(num_shards)]
    members = [[] for _ in range(num_shards)]
    for i in sorted(range(len(jobs)), key=lambda i: -len(jobs[i]['segments'])):
        load, k = heapq.heappop(heap)
        members[k].append(i)
        heapq.heappush(heap, (load + len(jobs[i]['segments']), k))
    return [[jobs[i] for i in sorted(m)] for m in members]


def segment_length(jobs):
    """The segment length: the first window of a video with several segments is a full one."""
    full = [j['segments'][0] for j in jobs if len(j['segments']) > 1]
    segs = full or [s for j in jobs for s in j['segments']]
    return max((round(s['end'] - s['start'], 6) for s in segs), default=0.0)


def encoders(paths):
    """The encoders that wrote the store files ``paths``: ``[{model, random_init, files, example}]``
    (their metadata, ``None`` where missing; how many files; one of them)."""
    found = {}
    for p in paths:
        try:
            found.setdefault(store_encoder(p), []).append(p)
        except EmbeddingError:
            continue
    return [dict(model=m, random_init=r, files=len(ps), example=ps[0]) for (m, r), ps in found.items()]


def main(args):
    if args.num_shards < 1:
        raise InputError('--num_shards must be >= 1')
    jobs = read_segments(args.segments_csv)
    embedding_dir = os.path.abspath(args.embedding_dir)
    for job in jobs:
        job['output_path'] = embedding_path(embedding_dir, job['video_id'])
    complete = [is_complete(j['output_path'], j['segments'], video_path=j['video_path']) for j in jobs]
    todo = [j for j, c in zip(jobs, complete) if not c]
    changed = sum(video_changed(j['output_path'], j['video_path']) for j in todo)
    done = encoders([j['output_path'] for j, c in zip(jobs, complete) if c])

    out_json = args.out_json or os.path.join(os.path.dirname(os.path.abspath(args.segments_csv)),
                                             'paired_paths.json')
    if args.num_shards == 1:
        files = [(out_json, todo)]
    else:
        stem = os.path.splitext(out_json)[0]
        files = [(f'{stem}_{k}of{args.num_shards}.json', shard)
                 for k, shard in enumerate(shard_jobs(todo, args.num_shards))]
    # the encoders of the complete files left out: step 3 refuses to add another encoder's files to them
    header = {'version': 1, 'segment_sec': segment_length(jobs), 'embedding_dir': embedding_dir,
              'complete_encoders': done}
    for path, shard in files:
        try:
            atomic_write_text(path, json.dumps(dict(header, jobs=shard), indent=1))
        except OSError as e:
            raise InputError(f'{path}: cannot write the job file ({e.strerror or e})') from None
        print(f'{path}: {len(shard)} videos, {sum(len(j["segments"]) for j in shard)} segments')
    print(f'{len(jobs)} videos in {args.segments_csv}: {len(jobs) - len(todo)} already complete in '
          f'{embedding_dir} (left out), {len(todo)} to do'
          + (f' ({changed} of them embedded before from a video file of another size: redone)' if changed else ''))
    for e in done:
        print(f'  {e["files"]} complete file(s) by {encoder_name(e["model"], e["random_init"])}')
    return files


if __name__ == '__main__':
    run_main(main, get_args_parser().parse_args())
