"""Speed of step 1 (segment_video_library_movie_clip.py): probing only (the default) and --reencode.
Prints one JSON line per measurement (video-minutes handled per wall-clock minute).

    python bench/bench_segment.py [--quick] [--num_videos 8] [--seconds 120] [--fps 25] [--size 320 240]
"""
import argparse
import contextlib
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo's top-level scripts
import segment_video_library_movie_clip as step1  # noqa: E402
from util.synthetic import color_frames, write_video


def main():
    parser = argparse.ArgumentParser('Benchmark step 1')
    parser.add_argument('--quick', action='store_true', help='4 videos of 30 s at 160x120')
    parser.add_argument('--num_videos', default=8, type=int)
    parser.add_argument('--seconds', default=120.0, type=float)
    parser.add_argument('--fps', default=25, type=int)
    parser.add_argument('--size', default=[320, 240], type=int, nargs=2)
    parser.add_argument('--num_workers', default=min(8, os.cpu_count() or 1), type=int)
    args = parser.parse_args()
    if args.quick:
        args.num_videos, args.seconds, args.size = 4, 30.0, [160, 120]

    with tempfile.TemporaryDirectory() as tmp:
        video_dir = os.path.join(tmp, 'videos')
        os.makedirs(video_dir)
        for i in range(args.num_videos):
            write_video(os.path.join(video_dir, f'v{i}.mp4'),
                        color_frames(args.seconds, fps=args.fps, size=tuple(args.size), seed=i), fps=args.fps)
        minutes = args.num_videos * args.seconds / 60
        for mode, extra in [('probe', []), ('reencode', ['--reencode'])]:
            argv = ['--video_dir', video_dir, '--output_dir', os.path.join(tmp, mode),
                    '--num_workers', str(args.num_workers), *extra]
            t0 = time.perf_counter()
            with contextlib.redirect_stdout(sys.stderr):  # the step's log; stdout has the JSON lines only
                segments, _ = step1.main(step1.get_args_parser().parse_args(argv))
            sec = time.perf_counter() - t0
            print(json.dumps({'bench': 'segment', 'mode': mode, 'videos': args.num_videos,
                              'video_seconds': args.seconds, 'fps': args.fps, 'size': args.size,
                              'num_workers': args.num_workers, 'segments': len(segments),
                              'wall_s': round(sec, 3), 'video_min_per_min': round(minutes / (sec / 60), 1)}))


if __name__ == '__main__':
    main()
