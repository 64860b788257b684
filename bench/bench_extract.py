"""Extraction throughput: our default path (time windows of the long videos, each decoded once)
against the original release's way (step 1 --reencode writes 5-second files, step 3 embeds them),
with the same encoder, on generated videos. One JSON line per measurement.

    python bench/bench_extract.py --quick                      # small, a minute on 2 CPU cores
    python bench/bench_extract.py --num_videos 2 --minutes 3   # the figures in docs/BENCHMARKS.md
    python bench/bench_extract.py --config huge --device cuda --dtype bf16 --batch_size 64 --skip_reencode
    python bench/bench_extract.py --decode_limit               # step 3 against decoding every frame

Throughput counts steps 1 + 3 (probe or re-encode, then embed). Step 3 loads the encoder's weights
while its workers already decode, so its time includes that overlap (its summary's ``model_load_s``;
about 0.1 s for the tiny encoder, much more for ``--config huge``).

``--decode_limit`` generates realistic H.264 (``--dl_videos`` videos, by default 2 of 2 minutes;
480x270, 30 fps, libx264's defaults with B-frames, textured moving content; ``--dl_codec vp9`` or
``av1``: those codecs, a key frame every 4 s), times decoding every frame of them with
``--num_workers`` processes, then step 3 (tiny random encoder, run as its own process) with the same
number of decoding workers: ``ratio`` = step 3's work time (its summary's
``seconds``) / the time to decode everything; ``decoding_side_ratio``: the same for step 3's
decoding alone with the transform left to the model's device (``--transform_on device``, the default
on a GPU), i.e. the CPU work of a GPU server, timed in as many processes; ``startup_s`` = from step
3's first line (its imports included; the interpreter's own start, about 0.04 s, is not) to its
first batch embedded.
"""
import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import langbind_preprocessing  # noqa: E402
import prepare_paired_paths  # noqa: E402
import segment_video_library_movie_clip as step1  # noqa: E402
from util.langbind import RANDOM_CONFIGS, load_encoder  # noqa: E402
from util.misc import default_device  # noqa: E402
from util.synthetic import color_frames, moving_texture_frames, write_video  # noqa: E402


def get_args_parser():
    parser = argparse.ArgumentParser('Extraction throughput benchmark', add_help=True)
    parser.add_argument('--num_videos', default=2, type=int)
    parser.add_argument('--minutes', default=3.0, type=float, help='length of each generated video')
    parser.add_argument('--width', default=640, type=int)
    parser.add_argument('--height', default=360, type=int)
    parser.add_argument('--fps', default=30, type=int)
    parser.add_argument('--config', default='tiny', choices=sorted(RANDOM_CONFIGS), help='random encoder size')
    parser.add_argument('--device', default='auto')
    parser.add_argument('--dtype', default='bf16', choices=['fp32', 'bf16', 'fp16'])
    parser.add_argument('--batch_size', default=16, type=int)
    parser.add_argument('--num_workers', default=2, type=int, help='decoding workers (step 3) and step 1 processes')
    parser.add_argument('--skip_reencode', action='store_true', help='time the default path only')
    parser.add_argument('--quick', action='store_true', help='1 video of 1 minute at 320x180')
    parser.add_argument('--work_dir', default=None, help='keep generated videos and outputs here (default: temp)')
    parser.add_argument('--decode_limit', action='store_true',
                        help='only the decode-limit measure (step 3 against decoding every frame)')
    parser.add_argument('--dl_seconds', default=120.0, type=float,
                        help='length of each decode-limit video (480x270, 30 fps)')
    parser.add_argument('--dl_codec', default='h264', choices=sorted(DL_CODECS),
                        help='codec of the decode-limit videos (encoders\' defaults but a key frame every 4 s '
                             'for vp9 and av1; h264: libx264\'s defaults)')
    parser.add_argument('--dl_videos', default=2, type=int,
                        help='decode-limit videos (e.g. 16 with --num_workers 16 on a 16-core GPU server: '
                             'one thread a worker)')
    parser.add_argument('--dl_grain', default=18, type=int,
                        help='amplitude of the per-frame sensor-like noise of the decode-limit videos (18: about '
                             '20 MB per 2-minute H.264 video, as camera footage at this size; 0: the smoother '
                             '6.6 MB videos of the measurements before 2026-11-30)')
    return parser


def emit(**kw):
    print(json.dumps(kw), flush=True)


def run_path(name, video_dir, work, args):
    """Steps 1-3 for one way; returns (seconds of step 1, seconds of step 3, segments)."""
    seg_dir, emb_dir = os.path.join(work, name, 'segments'), os.path.join(work, name, 'embeddings')
    shutil.rmtree(os.path.join(work, name), ignore_errors=True)
    t = time.time()
    step1.main(step1.get_args_parser().parse_args(
        ['--video_dir', video_dir, '--output_dir', seg_dir, '--num_workers', str(args.num_workers)]
        + (['--reencode'] if name == 'reencode' else [])))
    t1 = time.time() - t
    csv = os.path.join(seg_dir, 'segments_metadata.csv')
    prepare_paired_paths.main(prepare_paired_paths.get_args_parser().parse_args(
        ['--segments_csv', csv, '--embedding_dir', emb_dir]))
    summary = langbind_preprocessing.main(langbind_preprocessing.get_args_parser().parse_args(
        ['--video_path_file', os.path.join(seg_dir, 'paired_paths.json'), '--random_init', args.config,
         '--batch_size', str(args.batch_size), '--device', args.device, '--dtype', args.dtype,
         '--num_workers', str(args.num_workers)]))
    return t1, summary['seconds'], summary['segments']


@torch.no_grad()
def encoder_only(args, common):
    """Forward passes alone (random input): the ceiling the decoding has to keep up with."""
    device = torch.device(default_device(args.device))
    dtype = langbind_preprocessing.DTYPES[args.dtype]
    encoder = load_encoder(random_init=args.config).to(device)
    x = list(torch.randn(args.batch_size, 8, 3, 224, 224).transpose(1, 2))
    langbind_preprocessing.embed(encoder, x, args.batch_size, device, dtype)  # warm-up
    if device.type == 'cuda':
        torch.cuda.synchronize()
    n, t = 3, time.time()
    for _ in range(n):
        langbind_preprocessing.embed(encoder, x, args.batch_size, device, dtype)
    seconds = time.time() - t
    emit(measure='encoder_only', segments_per_s=round(n * args.batch_size / seconds, 2), **common)


def _decode_count(item):
    import av
    path, threads = item
    with av.open(path) as c:
        stream = c.streams.video[0]
        if threads > 1:
            stream.thread_type, stream.codec_context.thread_count = 'AUTO', threads
        return sum(1 for _ in c.decode(stream))


def in_processes(fn, items, processes):
    """Seconds for ``processes`` processes (started before timing; one torch thread each, as DataLoader
    workers have) to map ``fn`` over ``items``, and the results."""
    with ProcessPoolExecutor(max(processes, 1), initializer=torch.set_num_threads, initargs=(1,)) as pool:
        list(pool.map(abs, range(max(processes, 1))))
        t = time.time()
        out = list(pool.map(fn, items))
        return time.time() - t, out


def decode_all(paths, processes):
    """Seconds to decode every frame of ``paths`` with ``processes`` processes, each taking whole
    videos with its share of the cores as FFmpeg threads (the share step 3's workers get), and the
    frames."""
    threads = max(1, langbind_preprocessing.num_cpus() // max(processes, 1))
    seconds, counts = in_processes(_decode_count, [(p, threads) for p in paths], processes)
    return seconds, sum(counts)


def _decoding_side(item):
    job, threads = item
    # shared: each segment built in shared memory, as a DataLoader worker does (about 4 ms a raw
    # 480x270 segment, docs/BENCHMARKS.md)
    return sum(1 for _ in langbind_preprocessing.job_segments(job, threads, shared=True, raw=True))


DL_CODECS = {'h264': ('libx264', None, 'mp4'),
             'vp9': ('libvpx-vp9', {'g': '120', 'cpu-used': '8', 'threads': '1'}, 'webm'),
             'av1': ('libsvtav1', {'g': '120', 'preset': '10', 'svtav1-params': 'log-level=1'}, 'mp4')}


def _texture_video(item):
    path, seconds, seed, codec, grain = item
    encoder, options, _ = DL_CODECS[codec]
    write_video(path, moving_texture_frames(seconds, 30, (480, 270), seed=seed, grain=grain), fps=30, codec=encoder,
                options=options)


def decode_limit(args, work):
    # one folder per kind of videos: step 1 segments every video of it
    kind = f'{args.dl_codec}_{args.dl_videos}x{args.dl_seconds:g}s_grain{args.dl_grain}'
    video_dir = os.path.join(work, f'dl_videos_{kind}')
    os.makedirs(video_dir, exist_ok=True)
    ext = DL_CODECS[args.dl_codec][2]
    paths = [os.path.join(video_dir, f'texture{i}.{ext}') for i in range(args.dl_videos)]
    todo = [(p, args.dl_seconds, i, args.dl_codec, args.dl_grain) for i, p in enumerate(paths) if not os.path.isfile(p)]
    with ProcessPoolExecutor(max(1, min(len(todo), os.cpu_count()))) as pool:
        list(pool.map(_texture_video, todo))
    seg_dir, emb_dir = os.path.join(work, 'dl_segments'), os.path.join(work, 'dl_embeddings')
    shutil.rmtree(emb_dir, ignore_errors=True)
    with contextlib.redirect_stdout(sys.stderr):
        step1.main(step1.get_args_parser().parse_args(['--video_dir', video_dir, '--output_dir', seg_dir,
                                                       '--num_workers', '0']))
        prepare_paired_paths.main(prepare_paired_paths.get_args_parser().parse_args(
            ['--segments_csv', os.path.join(seg_dir, 'segments_metadata.csv'), '--embedding_dir', emb_dir]))
    decode_s, frames = decode_all(paths, args.num_workers)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    end = os.path.join(work, 'dl_end.json')
    t = time.time()
    subprocess.run([sys.executable, os.path.join(root, 'langbind_preprocessing.py'), '--video_path_file',
                    os.path.join(seg_dir, 'paired_paths.json'), '--random_init', 'tiny', '--batch_size',
                    str(args.batch_size), '--device', args.device, '--num_workers', str(args.num_workers),
                    '--end_job_file', end], check=True, stdout=sys.stderr, stderr=sys.stderr, cwd=root)
    wall = time.time() - t
    summary = json.load(open(end))
    # step 3's decoding workers alone with --transform_on device: what the CPUs of a GPU server do
    with open(os.path.join(seg_dir, 'paired_paths.json')) as f:
        jobs = json.load(f)['jobs']
    threads = max(1, langbind_preprocessing.num_cpus() // max(args.num_workers, 1))
    side_s, _ = in_processes(_decoding_side, [(job, threads) for job in jobs], args.num_workers)
    emit(measure='decode_limit', decode_all_s=round(decode_s, 2), step3_s=summary['seconds'],
         ratio=round(summary['seconds'] / decode_s, 3), step3_wall_s=round(wall, 2),
         decoding_side_s=round(side_s, 2), decoding_side_ratio=round(side_s / decode_s, 3),
         startup_s=summary['first_batch_s'],
         frames=frames, segments=summary['segments'], num_workers=args.num_workers, video='480x270@30',
         codec=args.dl_codec, grain=args.dl_grain,
         video_seconds=args.dl_seconds, num_videos=args.dl_videos,
         megabytes=round(sum(map(os.path.getsize, paths)) / 1e6, 1),
         cpus=os.cpu_count(), config='tiny', random_init=True)


def main(args):
    if args.decode_limit:
        work = args.work_dir or tempfile.mkdtemp(prefix='bench_extract_')
        decode_limit(args, work)
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)
        return
    if args.quick:
        args.num_videos, args.minutes, args.width, args.height = 1, 1.0, 320, 180
    work = args.work_dir or tempfile.mkdtemp(prefix='bench_extract_')
    video_dir = os.path.join(work, 'videos')
    os.makedirs(video_dir, exist_ok=True)
    for i in range(args.num_videos):
        path = os.path.join(video_dir, f'video{i}.mp4')
        if not os.path.isfile(path):
            write_video(path, color_frames(args.minutes * 60, args.fps, (args.width, args.height), seed=i),
                        fps=args.fps)
    video_minutes = args.num_videos * args.minutes
    common = dict(config=args.config, device=args.device, dtype=args.dtype, batch_size=args.batch_size,
                  num_workers=args.num_workers, video=f'{args.width}x{args.height}@{args.fps}',
                  video_minutes=video_minutes, cpus=os.cpu_count(), random_init=True)
    encoder_only(args, common)
    totals = {}
    for name in ['default'] + ([] if args.skip_reencode else ['reencode']):
        with contextlib.redirect_stdout(sys.stderr):  # the steps' logs; stdout has the JSON lines only
            t1, t3, segments = run_path(name, video_dir, work, args)
        totals[name] = t1 + t3
        emit(measure='extract', path=name, segments=segments, step1_s=round(t1, 2), step3_s=round(t3, 2),
             total_s=round(t1 + t3, 2), segments_per_s=round(segments / (t1 + t3), 2),
             video_minutes_per_min=round(video_minutes / ((t1 + t3) / 60), 2), **common)
    if 'reencode' in totals:
        emit(measure='speedup_default_vs_reencode', speedup=round(totals['reencode'] / totals['default'], 2),
             **common)
    if not args.work_dir:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == '__main__':
    main(get_args_parser().parse_args())
