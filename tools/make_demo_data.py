"""Generate the demo's long-video benchmark: real video files built from six visually distinct scene
kinds, many unlabelled videos for pretraining and fewer labelled ones in LVU's split-file format (so that
step 4 reads them as LVU), with two tasks that only the ORDER of scenes across the video decides and one
that pooling decides (the tint of every frame).

    python tools/make_demo_data.py --output_dir demo_out/data [--num_videos 150] [--num_unlabelled 450]
        [--min_segments 8] [--max_segments 12] [--fps 2] [--size 32] [--seed 0]

Writes ``videos/demo<i>.mp4`` (labelled, split 60/20/20 into train/val/test), ``unlabelled/u<i>.mp4``,
``lvu_1.0/{plot,direction,tint}/{train,val,test}.csv``, ``README.txt`` and ``stamp.json`` under
--output_dir. A rerun with the same arguments reuses the files. Same seed, same bytes: the videos are
MPEG-4 Part 2 from FFmpeg's own encoder, one thread.

Every video follows a "plot": a cyclic order of the six kinds (PLOTS, three of them), traversed forwards
or backwards from a random kind; each scene lasts a whole number of 5-second segments (2 or 3), so each
segment shows a single kind; every frame of a video carries its tint (a colour shift).
- plot (3 classes): which cyclic order the video follows. Every plot visits every kind equally often:
  the frequencies of kinds, hence a mean over segments, say nothing about it.
- direction (2 classes): forwards or backwards along its cycle. Same frequencies both ways.
- tint (3 classes): warm, neutral or cool colour shift of the whole video; every segment shows it, so
  pooling suffices (a sanity check).
Labels are independent and balanced in every split. Unlabelled videos are drawn the same way.
"""
import argparse
import json
import os
import re

import numpy as np

from util.fileio import atomic_write, atomic_write_text
from util.synthetic import write_video

SEGMENT_SEC = 5
KINDS = ('flat', 'hstripes', 'vstripes', 'checker', 'disc', 'diagonal')
# three cyclic orders of the six kinds; the six (plot, direction) cycles are all different (tested)
PLOTS = ((0, 1, 2, 3, 4, 5), (0, 2, 4, 1, 5, 3), (0, 3, 1, 4, 2, 5))
TINTS = ((12, 0, -12), (0, 0, 0), (-12, 0, 12))  # RGB shift of every frame: warm, neutral, cool
COLORS = {  # two base colours per kind (RGB), far apart between kinds
    'flat': ((230, 140, 40), (230, 140, 40)),
    'hstripes': ((40, 180, 60), (10, 30, 10)),
    'vstripes': ((220, 30, 30), (240, 240, 240)),
    'checker': ((230, 210, 40), (110, 40, 150)),
    'disc': ((245, 245, 245), (20, 30, 90)),
    'diagonal': ((40, 200, 220), (0, 0, 0)),
}
TASKS = {  # name -> class names
    'plot': [f'plot{i}' for i in range(len(PLOTS))],
    'direction': ['forwards', 'backwards'],
    'tint': ['warm', 'neutral', 'cool'],
}
ORDER_TASKS = ('plot', 'direction')
SPLITS = ('train', 'val', 'test')
VIDEO_RE = re.compile(r'^\.?(demo|u)\d+\.mp4(\..*\.tmp)?$')  # our videos and their leftover temporary files


def get_args_parser():
    parser = argparse.ArgumentParser('Generate the demo long-video benchmark', add_help=False)
    parser.add_argument('--output_dir', '--out_dir', dest='out_dir', default='demo_out/data',
                        help='where videos/, unlabelled/, lvu_1.0/ go')
    parser.add_argument('--num_videos', default=150, type=int, help='labelled videos, split 60/20/20')
    parser.add_argument('--num_unlabelled', default=450, type=int, help='unlabelled videos (pretraining)')
    parser.add_argument('--min_segments', default=8, type=int, help='shortest video, in 5-second segments')
    parser.add_argument('--max_segments', default=12, type=int, help='longest video, in 5-second segments')
    parser.add_argument('--fps', default=2, type=int)
    parser.add_argument('--size', default='32', help='frame size: W (square) or WxH, even numbers')
    parser.add_argument('--seed', default=0, type=int)
    return parser


def parse_size(size):
    """'64' -> (64, 64); '96x64' -> (96, 64)."""
    m = re.fullmatch(r'(\d+)(?:x(\d+))?', str(size))
    w, h = (int(m[1]), int(m[2] or m[1])) if m else (0, 0)
    if w < 16 or h < 16 or w % 2 or h % 2:
        raise ValueError(f'--size {size}: expected W or WxH, even numbers of at least 16 pixels')
    return w, h


def split_sizes(n):
    n_val = n_test = max(1, round(0.2 * n))
    if n - n_val - n_test < 1:
        raise ValueError(f'--num_videos {n}: need at least 3 videos (one per split)')
    return n - n_val - n_test, n_val, n_test


def layout(n, plot, direction, rng):
    """Kind of each of the ``n`` segments of one video: its plot's cycle, forwards or backwards, from a
    random kind; scenes of 2 or 3 segments."""
    cycle = [KINDS[k] for k in PLOTS[plot]]
    if direction:
        cycle = cycle[::-1]
    k = int(rng.integers(len(cycle)))
    kinds = []
    while len(kinds) < n:
        kinds += [cycle[k % len(cycle)]] * int(rng.integers(2, 4))
        k += 1
    return kinds[:n]


def make_plan(num_videos, num_unlabelled, min_segments, max_segments, seed):
    """Videos, splits, labels and segment kinds, all from ``seed`` (no video is written here)."""
    if not 2 <= min_segments <= max_segments:
        raise ValueError(f'--min_segments {min_segments} / --max_segments {max_segments}: need 2 <= min <= max')
    rng = np.random.default_rng(seed)
    perm = rng.permutation(num_videos)
    n_train, n_val, _ = split_sizes(num_videos)
    plan = []
    for k, i in enumerate(perm):  # labels cycle within the shuffled list: balanced splits
        split = 'train' if k < n_train else 'val' if k < n_train + n_val else 'test'
        plan.append(video_plan(f'demo{i:04d}', int(i), split, k, min_segments, max_segments, seed))
    plan.sort(key=lambda v: v['index'])
    for i in range(num_unlabelled):
        plan.append(video_plan(f'u{i:04d}', num_videos + i, 'unlabelled', i, min_segments, max_segments,
                               seed))
    return plan


def video_plan(video_id, index, split, combo, min_segments, max_segments, seed):
    vrng = np.random.default_rng([seed, index])
    n = int(vrng.integers(min_segments, max_segments + 1))
    # every prefix of the sequence 0, 1, 2, ... is nearly balanced for each task, and every 18 in a row
    # hold each (plot, direction, tint) combination once
    plot, direction = combo % len(PLOTS), combo % 2
    tint = (combo // (2 * len(PLOTS)) + plot) % len(TINTS)
    return {'video_id': video_id, 'imdb_id': f'tt{index + 1:07d}', 'index': index, 'split': split,
            'duration': n * SEGMENT_SEC, 'plot': plot, 'direction': direction, 'tint': tint,
            'segments': layout(n, plot, direction, vrng)}


def scenes(segments):
    """Maximal runs of one kind: ``[(kind, first_segment, num_segments)]``."""
    out = []
    for i, kind in enumerate(segments):
        if out and out[-1][0] == kind:
            out[-1][2] += 1
        else:
            out.append([kind, i, 1])
    return [tuple(s) for s in out]


def render_scene(kind, num_frames, size, rng):
    """``[T, H, W, 3]`` uint8 frames of one scene: the kind's pattern, moving, with a seeded colour
    jitter and pixel noise."""
    w, h = size
    s = h / 64  # pattern sizes scale with the frame
    t = np.arange(num_frames, dtype=np.float32)[:, None, None]
    y = np.arange(h, dtype=np.float32)[None, :, None]
    x = np.arange(w, dtype=np.float32)[None, None, :]
    speed = rng.uniform(0.5, 2.0) * rng.choice([-1, 1]) * s
    phase = rng.uniform(0, 64 * s)
    if kind == 'flat':
        mask = np.zeros((num_frames, 1, 1), dtype=bool)
    elif kind == 'hstripes':
        mask = ((y + speed * t + phase) // (8 * s)) % 2 == 0
    elif kind == 'vstripes':
        mask = ((x + speed * t + phase) // (4 * s)) % 2 == 0
    elif kind == 'checker':
        mask = ((x + speed * t + phase) // (8 * s) + (y + phase) // (8 * s)) % 2 == 0
    elif kind == 'diagonal':
        mask = ((x + y + speed * t + phase) // (6 * s)) % 2 == 0
    elif kind == 'disc':
        cx = w / 2 + 0.3 * w * np.sin(0.2 * speed * t / s + phase)
        cy = h / 2 + 0.3 * h * np.cos(0.15 * speed * t / s + phase)
        mask = (x - cx) ** 2 + (y - cy) ** 2 < (h / 6) ** 2
    else:
        raise ValueError(f'unknown scene kind {kind!r}')
    fg, bg = (np.array(c, dtype=np.float32) + rng.uniform(-20, 20, 3) for c in COLORS[kind])
    frames = np.where(mask[..., None], fg, bg)
    frames = np.broadcast_to(frames, (num_frames, h, w, 3)) + rng.integers(-6, 7, (num_frames, h, w, 3))
    return np.clip(frames, 0, 255).astype(np.uint8)


def render_video(video, fps, size, seed):
    """Frames of one planned video, scene after scene."""
    rng = np.random.default_rng([seed, video['index'], 1])
    per_segment = SEGMENT_SEC * fps
    tint = np.array(TINTS[video['tint']], dtype=np.int16)
    for kind, _, n in scenes(video['segments']):
        for frame in render_scene(kind, n * per_segment, size, rng):
            yield np.clip(frame + tint, 0, 255).astype(np.uint8)


def annotation_lines(task, videos):
    return ['class_id class_name youtube_id imdb_id'] + [
        f"{v[task]} {TASKS[task][v[task]]} {v['video_id']} {v['imdb_id']}" for v in videos]


def readme_text(args, plan):
    w, h = parse_size(args.size)
    counts = {s: sum(v['split'] == s for v in plan) for s in SPLITS + ('unlabelled',)}
    cycles = '; '.join(f'plot{i}: ' + ' > '.join(KINDS[k] for k in p) for i, p in enumerate(PLOTS))
    return f"""Demo long-video benchmark written by tools/make_demo_data.py ({json.dumps(stamp_args(args))}).

{counts['unlabelled']} unlabelled videos in unlabelled/ (for pretraining) and {args.num_videos} labelled videos in
videos/ (train/val/test: {counts['train']}/{counts['val']}/{counts['test']}), {args.min_segments} to \
{args.max_segments} segments of {SEGMENT_SEC} s each, {w}x{h} pixels at {args.fps} fps, MPEG-4 in .mp4.
Each video is a sequence of scenes, each a whole number of {SEGMENT_SEC}-second segments, so every segment
shows one scene kind: {', '.join(KINDS)}. A video follows the cyclic order of one plot
({cycles}), forwards or backwards, from a random kind; scenes last 2 or 3 segments. Every frame of a video is shifted by its tint (RGB).
Labels are in LVU's split-file format (space-separated, one header line) in lvu_1.0/<task>/<split>.csv:
- plot: which cyclic order (chance 1/3). Every kind appears equally often in every plot: only order tells.
- direction: forwards (0) or backwards (1) along the cycle (chance 1/2). Only order tells.
- tint: the colour shift of the whole video, warm {TINTS[0]}, neutral or cool {TINTS[2]} (chance 1/3);
  every segment shows it: pooling suffices.
Labels are independent and balanced in every split. The imdb ids are fake.
"""


def stamp_args(args):
    return {k: getattr(args, k) for k in ('num_videos', 'num_unlabelled', 'min_segments', 'max_segments', 'fps',
                                          'size', 'seed')}


def video_path(out_dir, v):
    return os.path.join(out_dir, 'unlabelled' if v['split'] == 'unlabelled' else 'videos', v['video_id'] + '.mp4')


def expected_files(out_dir, plan):
    files = [video_path(out_dir, v) for v in plan]
    files += [os.path.join(out_dir, 'lvu_1.0', t, s + '.csv') for t in TASKS for s in SPLITS]
    return files + [os.path.join(out_dir, 'README.txt')]


def generate(args):
    """Write the benchmark under ``args.out_dir`` (or reuse it) and return the plan."""
    if args.fps < 1:
        raise ValueError(f'--fps {args.fps}: must be a positive integer')
    if args.num_unlabelled < 0:
        raise ValueError(f'--num_unlabelled {args.num_unlabelled}: must be 0 or more')
    size = parse_size(args.size)
    plan = make_plan(args.num_videos, args.num_unlabelled, args.min_segments, args.max_segments, args.seed)
    stamp = os.path.join(args.out_dir, 'stamp.json')
    stamp_text = json.dumps({'generator': 'tools/make_demo_data.py', 'args': stamp_args(args)}, sort_keys=True)
    if os.path.isfile(stamp):
        with open(stamp) as f:
            same = f.read() == stamp_text
        if same and all(os.path.isfile(p) for p in expected_files(args.out_dir, plan)):
            print(f'{args.out_dir}: demo data already generated with these arguments, reused')
            return plan
        os.remove(stamp)  # a run killed from here on is not taken for a finished one
    keep = {video_path(args.out_dir, v) for v in plan}
    for folder in ('videos', 'unlabelled'):
        os.makedirs(os.path.join(args.out_dir, folder), exist_ok=True)
        for name in os.listdir(os.path.join(args.out_dir, folder)):  # videos of an earlier run with other arguments
            path = os.path.join(args.out_dir, folder, name)
            if VIDEO_RE.match(name) and path not in keep:
                os.remove(path)
    for v in plan:
        atomic_write(video_path(args.out_dir, v),
                     lambda tmp: write_video(tmp, render_video(v, args.fps, size, args.seed), fps=args.fps,
                                             codec='mpeg4', options={'threads': '1'}, format='mp4'))
    for task in TASKS:
        for split in SPLITS:
            videos = [v for v in plan if v['split'] == split]
            atomic_write_text(os.path.join(args.out_dir, 'lvu_1.0', task, split + '.csv'),
                              '\n'.join(annotation_lines(task, videos)) + '\n')
    atomic_write_text(os.path.join(args.out_dir, 'README.txt'), readme_text(args, plan))
    atomic_write_text(stamp, stamp_text)
    n_lab = sum(v['split'] != 'unlabelled' for v in plan)
    print(f'{args.out_dir}: wrote {n_lab} labelled videos (tasks {", ".join(TASKS)}) and '
          f'{len(plan) - n_lab} unlabelled ones (see README.txt)')
    return plan


if __name__ == '__main__':
    generate(argparse.ArgumentParser(parents=[get_args_parser()]).parse_args())
