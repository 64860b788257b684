"""Step 1: find the videos of a folder (recursively) and cut each into consecutive segment windows.

Writes ``<output_dir>/segments_metadata.csv`` (one row per segment) and ``<output_dir>/bad_videos.csv``
(videos skipped, with the reason). With ``--reencode`` each segment is also written as its own
H.264 file ``<output_dir>/<video_id>/<start>-<end>/video.mp4`` (the original release's layout).

    python segment_video_library_movie_clip.py --video_dir videos/ --output_dir data/lvu_segments
"""
import argparse
import multiprocessing
import os
import sys
import tempfile
from collections import defaultdict
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from functools import partial
from itertools import islice

import pandas as pd
from tqdm import tqdm

from util.errors import InputError, run_main
from util.fileio import atomic_write
from util.video import VideoError, probe_video, reencode_segments, segment_file, segment_windows

SEGMENT_COLUMNS = ['video_id', 'video_path', 'segment_index', 'start', 'end', 'num_frames', 'fps',
                   'duration', 'segment_path']
BAD_COLUMNS = ['video_path', 'reason']


def get_args_parser():
    parser = argparse.ArgumentParser('Cut long videos into segment windows', add_help=True)
    parser.add_argument('--video_dir', required=True, help='folder searched recursively for videos')
    parser.add_argument('--output_dir', '--out_dir', dest='output_dir', required=True,
                        help='where segments_metadata.csv, bad_videos.csv (and --reencode files) go '
                             '(--out_dir: the same flag under its former name)')
    parser.add_argument('--segment_sec', default=5.0, type=float, help='segment length in seconds')
    parser.add_argument('--min_last_sec', default=1.0, type=float,
                        help='drop a final segment shorter than this (seconds)')
    parser.add_argument('--extensions', nargs='+', default=['mp4', 'mkv', 'webm', 'avi', 'mov'],
                        help='video file extensions (case-insensitive)')
    parser.add_argument('--num_workers', default=min(8, os.cpu_count() or 1), type=int,
                        help='processes probing (and re-encoding) videos in parallel; 0 = in this process')
    parser.add_argument('--reencode', action='store_true',
                        help='also write each segment as its own H.264 file (slower, needs disk space)')
    parser.add_argument('--strict', action='store_true',
                        help='exit with status 1 when any video was skipped (default: list it in bad_videos.csv '
                             'and go on)')
    return parser


def video_id(path, video_dir):
    """Path relative to ``video_dir`` without extension, '/' replaced by '-' (see docs/DATA.md)."""
    return os.path.splitext(os.path.relpath(path, video_dir))[0].replace(os.sep, '-')


def find_videos(video_dir, extensions, exclude_dir=None):
    """``{video_id: absolute path}`` of every video under ``video_dir`` (skipping ``exclude_dir``).
    Links to folders are followed; a folder reached twice (two links, a link back up) is searched once,
    under its first path in sorted order. Hidden files and folders (names starting with '.': macOS's
    ``._<name>`` companions of copied files, a ``.Trash-1000`` folder) are skipped. Raises
    ``InputError`` listing every video id that two files would share."""
    exts = {'.' + e.lower().lstrip('.') for e in extensions}
    seen = {os.path.realpath(p) for p in (video_dir, exclude_dir) if p}
    by_id = defaultdict(list)
    for root, dirs, files in os.walk(video_dir, followlinks=True):
        keep = []
        for d in sorted(dirs):
            real = os.path.realpath(os.path.join(root, d))
            if real not in seen and not d.startswith('.'):
                seen.add(real)
                keep.append(d)
        dirs[:] = keep
        for name in files:
            if os.path.splitext(name)[1].lower() in exts and not name.startswith('.'):
                path = os.path.abspath(os.path.join(root, name))
                by_id[video_id(path, os.path.abspath(video_dir))].append(path)
    clashes = {vid: paths for vid, paths in by_id.items() if len(paths) > 1}
    if clashes:
        lines = '\n'.join(f'  {vid}: {", ".join(sorted(p))}' for vid, p in sorted(clashes.items()))
        raise InputError(f'several files give the same video id (rename them or narrow --extensions):\n{lines}')
    return {vid: paths[0] for vid, paths in sorted(by_id.items())}


def process_video(item, segment_sec, min_last_sec, reencode_dir=None):
    """Probe one video (and re-encode its segments): returns ``(segment rows, None)`` or
    ``([], reason)`` (any error: one video never stops the others). Runs in a worker process."""
    vid, path = item
    try:
        info = probe_video(path)
        windows = segment_windows(info.duration, segment_sec, min_last_sec)
        if not windows:
            raise VideoError(f'shorter ({info.duration:.2f} s) than --min_last_sec {min_last_sec}')
        seg_paths = [''] * len(windows)
        if reencode_dir:
            seg_paths = [segment_file(reencode_dir, vid, s, e) for s, e in windows]
            reencode_segments(path, windows, seg_paths, timed=info.timed)
    except VideoError as e:
        return [], str(e)
    except Exception as e:  # noqa: BLE001 -- one video never stops the others (a name too long, a full disk)
        return [], f'{type(e).__name__}: {e}'
    rows = [dict(video_id=vid, video_path=path, segment_index=k, start=s, end=e, num_frames=info.num_frames,
                 fps=info.fps, duration=info.duration, segment_path=p)
            for k, ((s, e), p) in enumerate(zip(windows, seg_paths))]
    return rows, None


_STARTED = None  # in a worker process: the items started so far (shared memory)


def _remember(started):
    global _STARTED
    _STARTED = started


def _tracked(work, i, item):
    _STARTED[i] = 1
    return work(item)


def in_processes(work, items, num_workers, bar):
    """``[work(item) for item in items]`` in ``num_workers`` processes (``bar``: a tqdm to update). A
    process that dies (FFmpeg crashing on a file, the out-of-memory killer) stops none of the others:
    the items it may have been on are done again one at a time, and one that kills its process again
    gives ``([], reason)``."""
    results = [None] * len(items)
    started = multiprocessing.Array('b', len(items), lock=False)

    def run(todo, workers):  # None, or the error's message when a process died
        # at most 4 items a process handed out at a time: a death then costs those, not the whole library
        with ProcessPoolExecutor(workers, initializer=_remember, initargs=(started,)) as pool:
            pending, rest = {}, iter(todo)
            try:
                while True:
                    for i in islice(rest, 4 * workers - len(pending)):
                        pending[pool.submit(_tracked, work, i, items[i])] = i
                    if not pending:
                        return None
                    finished, _ = wait(pending, return_when=FIRST_COMPLETED)
                    for f in finished:
                        results[pending[f]] = f.result()
                        del pending[f]
                        bar.update()
            except BrokenProcessPool as e:  # (from result(), or from submit once a process died)
                for f, i in pending.items():  # those that finished before it broke
                    if f.done() and f.exception() is None:
                        results[i] = f.result()
                        bar.update()
                return str(e)

    todo = list(range(len(items)))
    while (crash := run(todo, num_workers)) is not None:
        suspects = [i for i in todo if started[i] and results[i] is None]
        if not suspects:
            raise RuntimeError(crash)
        tqdm.write(f'a worker process died ({crash}); doing the {len(suspects)} video(s) it may have been on '
                   f'one at a time')
        for i in suspects:
            if (alone := run([i], 1)) is not None:
                results[i] = ([], f'its process died ({alone})')
                bar.update()
        todo = [i for i in todo if results[i] is None]
    return results


def write_csv(path, rows, columns):
    atomic_write(path, lambda tmp: pd.DataFrame(rows, columns=columns).to_csv(tmp, index=False))


def check_writable(folder):
    """Create ``folder`` and write a file there now, before hours of probing (InputError if not)."""
    try:
        os.makedirs(folder, exist_ok=True)
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as e:
        raise InputError(f'--output_dir {folder}: cannot write there ({e.strerror or e})') from None


def main(args):
    if not os.path.isdir(args.video_dir):
        raise InputError(f'--video_dir {args.video_dir} is not a folder')
    if not 0 <= args.min_last_sec <= args.segment_sec or args.segment_sec <= 0:
        raise InputError('need --segment_sec > 0 and 0 <= --min_last_sec <= --segment_sec')
    out_dir = os.path.abspath(args.output_dir)
    videos = find_videos(args.video_dir, args.extensions, exclude_dir=out_dir)
    if not videos:
        raise InputError(f'--video_dir {args.video_dir}: no video files (extensions {" ".join(args.extensions)}; '
                         f'subfolders are searched too)')
    check_writable(out_dir)
    print(f'found {len(videos)} videos under {args.video_dir}')

    work = partial(process_video, segment_sec=args.segment_sec, min_last_sec=args.min_last_sec,
                   reencode_dir=out_dir if args.reencode else None)
    bar = tqdm(total=len(videos), unit='video', desc='re-encoding' if args.reencode else 'probing')
    if args.num_workers > 0 and len(videos) > 1:
        results = in_processes(work, list(videos.items()), args.num_workers, bar)
    else:
        results = []
        for item in videos.items():
            results.append(work(item))
            bar.update()
    bar.close()

    segments, bad = [], []
    for path, (rows, reason) in zip(videos.values(), results):
        segments.extend(rows)
        if reason:
            bad.append(dict(video_path=path, reason=reason))
    write_csv(os.path.join(out_dir, 'segments_metadata.csv'), segments, SEGMENT_COLUMNS)
    write_csv(os.path.join(out_dir, 'bad_videos.csv'), bad, BAD_COLUMNS)

    for b in bad[:20]:
        print(f'  skipped {b["video_path"]}: {b["reason"]}')
    if len(bad) > 20:
        print(f'  ... {len(bad) - 20} more in bad_videos.csv')
    print(f'videos: {len(videos)} found, {len(videos) - len(bad)} segmented into {len(segments)} segments '
          f'of {args.segment_sec:g} s, {len(bad)} skipped (listed in {os.path.join(out_dir, "bad_videos.csv")}) '
          f'-> {out_dir}')
    if args.strict and bad:
        sys.exit(1)
    return segments, bad


if __name__ == '__main__':
    run_main(main, get_args_parser().parse_args())
