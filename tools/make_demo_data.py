"""Generate the demo's long-video benchmark: real video files built from a few visually distinct
scene kinds, with labels for three tasks in LVU's split-file format (so that step 4 reads them as LVU).

    python tools/make_demo_data.py --out_dir demo_out/data [--num_videos 150] [--min_minutes 1]
        [--max_minutes 2] [--fps 4] [--size 64] [--max_count 4] [--seed 0]

Writes ``videos/demo<i>.mp4``, ``lvu_1.0/{mix,order,view_count}/{train,val,test}.csv``, ``README.txt`` and
``stamp.json`` under --out_dir. A rerun with the same arguments reuses the files. Same seed, same bytes:
the videos are MPEG-4 Part 2 from FFmpeg's own encoder, one thread (libx264 in PyAV's wheel gave different
bytes for identical frames in some runs, even with one thread).

Every scene lasts a whole number of 5-second segments, so each segment shows a single kind.
- mix (3 classes): which of the kinds flat / hstripes / disc fills more than half of the time not taken by
  the order and count kinds.
- order (2 classes): vstripes and checker each appear once, for the same number of segments, one in the
  first third of the video and the other in the last third; label 1 if vstripes comes first. A mean over
  segments cannot tell the classes apart.
- view_count (a count, as a regression in LVU's view_count format, under that name so that step 4 reads
  it as LVU's): c segments of the kind 'diagonal' (c uniform in 0..max_count);
  view_count = round(exp(VIEW_COUNT_OFFSET + c - max_count / 2)), so step 4's target
  ln(view_count) - VIEW_COUNT_OFFSET equals c - max_count / 2 (to within 1e-4).
"""
import argparse
import json
import math
import os
import re

import numpy as np

from util.fileio import atomic_write, atomic_write_text
from util.synthetic import write_video
from util.tasks import VIEW_COUNT_OFFSET

SEGMENT_SEC = 5
MIX_KINDS = ('flat', 'hstripes', 'disc')
ORDER_KINDS = ('vstripes', 'checker')        # A, B
COUNT_KIND = 'diagonal'
KINDS = MIX_KINDS + ORDER_KINDS + (COUNT_KIND,)
COLORS = {  # two base colours per kind (RGB)
    'flat': ((230, 140, 40), (230, 140, 40)),
    'hstripes': ((40, 180, 60), (10, 30, 10)),
    'disc': ((245, 245, 245), (20, 30, 90)),
    'vstripes': ((220, 30, 30), (240, 240, 240)),
    'checker': ((230, 210, 40), (110, 40, 150)),
    'diagonal': ((40, 200, 220), (0, 0, 0)),
}
TASKS = {  # name -> class names (None: regression in view_count format)
    'mix': [f'{k}_dominant' for k in MIX_KINDS],
    'order': [f'{ORDER_KINDS[1]}_first', f'{ORDER_KINDS[0]}_first'],
    'view_count': None,
}
SPLITS = ('train', 'val', 'test')
VIDEO_RE = re.compile(r'^\.?demo\d+\.mp4(\..*\.tmp)?$')  # our videos and their leftover temporary files


def get_args_parser():
    parser = argparse.ArgumentParser('Generate the demo long-video benchmark', add_help=False)
    parser.add_argument('--out_dir', default='demo_out/data', help='where videos/, lvu_1.0/ and README.txt go')
    parser.add_argument('--num_videos', default=150, type=int, help='split 60/20/20 into train/val/test')
    parser.add_argument('--min_minutes', default=1.0, type=float)
    parser.add_argument('--max_minutes', default=2.0, type=float)
    parser.add_argument('--fps', default=4, type=int)
    parser.add_argument('--size', default='64', help='frame size: W (square) or WxH, even numbers')
    parser.add_argument('--max_count', default=4, type=int, help='view_count task: 0..max_count diagonal segments')
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


def order_block(n):
    """Segments of each order kind in a video of ``n`` segments."""
    return max(1, n // 6)


def segment_range(min_minutes, max_minutes, max_count):
    lo = math.ceil(min_minutes * 60 / SEGMENT_SEC)
    hi = math.floor(max_minutes * 60 / SEGMENT_SEC)
    if lo > hi:
        raise ValueError(f'no whole number of {SEGMENT_SEC}-second segments between --min_minutes '
                         f'{min_minutes} and --max_minutes {max_minutes}')
    if lo - 2 * order_block(lo) - max_count < 3:
        raise ValueError(f'--min_minutes {min_minutes} is too short for --max_count {max_count}: a video of '
                         f'{lo} segments needs 2*{order_block(lo)} order + {max_count} count + 3 mix segments')
    return lo, hi


def layout(n, mix, order, count, rng):
    """Kind of each of the ``n`` segments of one video."""
    kinds = [None] * n
    m, third = order_block(n), n // 3
    s1 = int(rng.integers(0, third - m + 1))            # first order block: inside the first third
    s2 = int(rng.integers(n - third, n - m + 1))         # second one: inside the last third
    first, second = (ORDER_KINDS[0], ORDER_KINDS[1]) if order == 1 else (ORDER_KINDS[1], ORDER_KINDS[0])
    kinds[s1:s1 + m], kinds[s2:s2 + m] = [first] * m, [second] * m
    free = [i for i in range(n) if kinds[i] is None]
    for i in rng.choice(free, size=count, replace=False):
        kinds[i] = COUNT_KIND
    free = [i for i in range(n) if kinds[i] is None]
    r = len(free)
    n_dom = int(rng.integers(r // 2 + 1, max(r // 2 + 1, round(0.75 * r)) + 1))  # strictly more than half
    n_other = int(rng.integers(0, r - n_dom + 1))
    others = [k for k in MIX_KINDS if k != MIX_KINDS[mix]]
    runs = []  # scenes of 1 to 3 segments, shuffled
    for kind, total in ((MIX_KINDS[mix], n_dom), (others[0], n_other), (others[1], r - n_dom - n_other)):
        while total > 0:
            length = min(total, int(rng.integers(1, 4)))
            runs.append([kind] * length)
            total -= length
    filler = [runs[i] for i in rng.permutation(len(runs))]
    for i, kind in zip(free, sum(filler, [])):
        kinds[i] = kind
    return kinds


def make_plan(num_videos, min_minutes, max_minutes, max_count, seed):
    """Videos, splits, labels and segment kinds, all from ``seed`` (no video is written here)."""
    lo, hi = segment_range(min_minutes, max_minutes, max_count)
    rng = np.random.default_rng(seed)
    perm = rng.permutation(num_videos)
    n_train, n_val, _ = split_sizes(num_videos)
    plan = []
    for k, i in enumerate(perm):  # labels cycle within the shuffled list: balanced in every split
        split = 'train' if k < n_train else 'val' if k < n_train + n_val else 'test'
        vrng = np.random.default_rng([seed, int(i)])
        n = int(vrng.integers(lo, hi + 1))
        mix, order, count = k % len(MIX_KINDS), k % 2, int(vrng.integers(0, max_count + 1))
        plan.append({
            'video_id': f'demo{i:04d}', 'imdb_id': f'tt{i + 1:07d}', 'index': int(i), 'split': split,
            'duration': n * SEGMENT_SEC, 'mix': mix, 'order': order, 'count': count,
            'view_count': int(round(math.exp(VIEW_COUNT_OFFSET + count - max_count / 2))),
            'segments': layout(n, mix, order, count, vrng),
        })
    return sorted(plan, key=lambda v: v['index'])


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
    for kind, _, n in scenes(video['segments']):
        yield from render_scene(kind, n * per_segment, size, rng)


def annotation_lines(task, videos):
    if TASKS[task] is None:
        return ['view_count youtube_id imdb_id'] + [
            f"{v['view_count']} {v['video_id']} {v['imdb_id']}" for v in videos]
    return ['class_id class_name youtube_id imdb_id'] + [
        f"{v[task]} {TASKS[task][v[task]]} {v['video_id']} {v['imdb_id']}" for v in videos]


def readme_text(args, plan):
    w, h = parse_size(args.size)
    counts = {s: sum(v['split'] == s for v in plan) for s in SPLITS}
    return f"""Demo long-video benchmark written by tools/make_demo_data.py ({json.dumps(stamp_args(args))}).

{len(plan)} videos in videos/ (train/val/test: {counts['train']}/{counts['val']}/{counts['test']}), \
{args.min_minutes} to {args.max_minutes} minutes each, {w}x{h} pixels at {args.fps} fps, MPEG-4 in .mp4.
Each video is a sequence of scenes, each a whole number of {SEGMENT_SEC}-second segments, so every segment
shows one scene kind: {', '.join(KINDS)}.
Labels are in LVU's split-file format (space-separated, one header line) in lvu_1.0/<task>/<split>.csv:
- mix: class_id = which of {', '.join(MIX_KINDS)} fills more than half of the segments not taken by
  {', '.join(ORDER_KINDS)} or {COUNT_KIND} (classes {', '.join(TASKS['mix'])}; chance 1/3).
- order: {ORDER_KINDS[0]} and {ORDER_KINDS[1]} each appear once, for the same number of segments
  (max(1, N // 6) of the video's N), one in the first third and the other in the last third;
  class 1 ({TASKS['order'][1]}) if {ORDER_KINDS[0]} comes first, else 0 (chance 1/2).
- view_count: a count, as a regression in LVU's view_count format; the video has c segments of {COUNT_KIND}
  (c uniform in 0..{args.max_count}) and view_count = round(exp({VIEW_COUNT_OFFSET} + c - {args.max_count}/2)),
  so ln(view_count) - {VIEW_COUNT_OFFSET} = c - {args.max_count / 2:g}.
Labels of mix and order are balanced in every split. The imdb ids are fake.
"""


def stamp_args(args):
    return {k: getattr(args, k) for k in ('num_videos', 'min_minutes', 'max_minutes', 'fps', 'size',
                                          'max_count', 'seed')}


def expected_files(out_dir, plan):
    files = [os.path.join(out_dir, 'videos', v['video_id'] + '.mp4') for v in plan]
    files += [os.path.join(out_dir, 'lvu_1.0', t, s + '.csv') for t in TASKS for s in SPLITS]
    return files + [os.path.join(out_dir, 'README.txt')]


def generate(args):
    """Write the benchmark under ``args.out_dir`` (or reuse it) and return the plan."""
    if args.fps < 1:
        raise ValueError(f'--fps {args.fps}: must be a positive integer')
    size = parse_size(args.size)
    plan = make_plan(args.num_videos, args.min_minutes, args.max_minutes, args.max_count, args.seed)
    stamp = os.path.join(args.out_dir, 'stamp.json')
    stamp_text = json.dumps({'generator': 'tools/make_demo_data.py', 'args': stamp_args(args)}, sort_keys=True)
    if os.path.isfile(stamp):
        with open(stamp) as f:
            same = f.read() == stamp_text
        if same and all(os.path.isfile(p) for p in expected_files(args.out_dir, plan)):
            print(f'{args.out_dir}: demo data already generated with these arguments, reused')
            return plan
        os.remove(stamp)  # a run killed from here on is not taken for a finished one
    video_dir = os.path.join(args.out_dir, 'videos')
    os.makedirs(video_dir, exist_ok=True)
    keep = {v['video_id'] + '.mp4' for v in plan}
    for name in os.listdir(video_dir):  # videos of an earlier run with other arguments
        if VIDEO_RE.match(name) and name not in keep:
            os.remove(os.path.join(video_dir, name))
    for v in plan:
        path = os.path.join(video_dir, v['video_id'] + '.mp4')
        atomic_write(path, lambda tmp: write_video(tmp, render_video(v, args.fps, size, args.seed), fps=args.fps,
                                                   codec='mpeg4', options={'threads': '1'}, format='mp4'))
    for task in TASKS:
        for split in SPLITS:
            videos = [v for v in plan if v['split'] == split]
            atomic_write_text(os.path.join(args.out_dir, 'lvu_1.0', task, split + '.csv'),
                       '\n'.join(annotation_lines(task, videos)) + '\n')
    atomic_write_text(os.path.join(args.out_dir, 'README.txt'), readme_text(args, plan))
    atomic_write_text(stamp, stamp_text)
    print(f'{args.out_dir}: wrote {len(plan)} videos and the tasks {", ".join(TASKS)} (see README.txt)')
    return plan


if __name__ == '__main__':
    generate(argparse.ArgumentParser(parents=[get_args_parser()]).parse_args())
