"""The generated demo benchmark (tools/make_demo_data.py): files, labels, determinism, reuse."""
import argparse
import os
import subprocess
import sys

import av
import numpy as np
import pytest

from tools import make_demo_data as demo

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(num_videos=5, num_unlabelled=2, min_segments=9, max_segments=10, fps=2, size='32x24', seed=0)


def make_args(out_dir, **overrides):
    return argparse.Namespace(out_dir=str(out_dir), **dict(TINY, **overrides))


def read_split(path):
    with open(path) as f:
        lines = f.read().splitlines()
    return lines[0].split(), [line.split() for line in lines[1:]]


def check_labels(v):
    """The segments follow the video's plot and direction; scenes last 2 or 3 segments."""
    cycle = [demo.KINDS[k] for k in demo.PLOTS[v['plot']]]
    if v['direction']:
        cycle = cycle[::-1]
    runs = demo.scenes(v['segments'])
    for (kind, _, n), (nxt, _, _) in zip(runs, runs[1:]):       # each scene is followed by the next kind
        assert cycle[(cycle.index(kind) + 1) % 6] == nxt
    for kind, first, n in runs[1:-1]:                             # whole scenes (not cut by the video's ends)
        assert n in (2, 3)


def test_plots_are_six_different_cycles():
    cycles = set()
    for p in demo.PLOTS:
        assert sorted(p) == list(range(len(demo.KINDS)))
        for r in (list(p), list(p)[::-1]):
            cycles.add(min(tuple(r[i:] + r[:i]) for i in range(len(r))))
    assert len(cycles) == 2 * len(demo.PLOTS)


def test_files_decode_and_labels_follow_the_rules(tmp_path):
    args = make_args(tmp_path)
    plan = demo.generate(args)
    assert [v['video_id'] for v in plan] == [f'demo{i:04d}' for i in range(5)] + ['u0000', 'u0001']
    assert [v['split'] for v in plan[5:]] == ['unlabelled'] * 2
    for v in plan:
        assert 45 <= v['duration'] <= 50 and len(v['segments']) * demo.SEGMENT_SEC == v['duration']
        check_labels(v)
        folder = 'unlabelled' if v['split'] == 'unlabelled' else 'videos'
        with av.open(str(tmp_path / folder / f"{v['video_id']}.mp4")) as c:
            frames = np.stack([f.to_ndarray(format='rgb24') for f in c.decode(video=0)])
            assert float(c.duration / av.time_base) == pytest.approx(v['duration'], abs=0.5)
        assert frames.shape == (v['duration'] * args.fps, 24, 32, 3)
        # the file shows the planned scenes: each decoded segment is nearer to its own rendering than to
        # the rendering of any segment of another kind
        per_segment = demo.SEGMENT_SEC * args.fps
        decoded = frames.reshape(-1, per_segment, 24, 32, 3).astype(float)
        rendered = np.stack(list(demo.render_video(v, args.fps, (32, 24), args.seed))).reshape(decoded.shape)
        for i, kind in enumerate(v['segments']):
            dist = np.abs(decoded[i] - rendered).mean(axis=(1, 2, 3, 4))
            assert all(dist[i] < dist[j] for j, other in enumerate(v['segments']) if other != kind)
    for task, names in demo.TASKS.items():
        for split in demo.SPLITS:
            header, rows = read_split(tmp_path / 'lvu_1.0' / task / f'{split}.csv')
            videos = [v for v in plan if v['split'] == split]
            assert [r[-2] for r in rows] == [v['video_id'] for v in videos] and videos
            assert header == ['class_id', 'class_name', 'youtube_id', 'imdb_id']
            assert [(int(r[0]), r[1]) for r in rows] == [(v[task], names[v[task]]) for v in videos]
            assert all(r[-1].startswith('tt') for r in rows)
    assert [sum(v['split'] == s for v in plan) for s in demo.SPLITS] == [3, 1, 1]
    assert 'direction' in (tmp_path / 'README.txt').read_text()


def test_larger_plan_is_balanced_and_kind_frequencies_say_nothing():
    plan = demo.make_plan(72, 36, 12, 20, seed=3)
    for v in plan:
        assert 12 <= len(v['segments']) <= 20
        check_labels(v)
    for split in demo.SPLITS + ('unlabelled',):
        vs = [v for v in plan if v['split'] == split]
        for task, names in demo.TASKS.items():
            counts = np.bincount([v[task] for v in vs], minlength=len(names))
            assert counts.max() - counts.min() <= 2, (split, task, counts)
    # the frequencies of kinds: the same on average for every plot and direction (and tint)
    freq = lambda v: np.array([v['segments'].count(k) for k in demo.KINDS]) / len(v['segments'])
    for task in demo.TASKS:
        means = [np.mean([freq(v) for v in plan if v[task] == c], axis=0) for c in range(len(demo.TASKS[task]))]
        assert max(np.abs(m - means[0]).max() for m in means) < 0.05, task


def test_tint_shifts_every_frame():
    v = demo.make_plan(18, 0, 8, 8, seed=0)[0]
    means = []
    for tint in range(3):
        frames = np.stack(list(demo.render_video(dict(v, tint=tint), 2, (32, 32), 0))).astype(float)
        means.append(frames.mean(axis=(1, 2)))                        # [T, 3] mean colour of each frame
    warm, neutral, cool = means
    assert (warm[:, 0] > neutral[:, 0]).all() and (warm[:, 2] < neutral[:, 2]).all()
    assert (cool[:, 0] < neutral[:, 0]).all() and (cool[:, 2] > neutral[:, 2]).all()


def test_scene_kinds_are_distinct():
    """Nearest mean colour and contrast picks the right kind for scenes of unseen seeds."""
    def feature(kind, seed):
        f = demo.render_scene(kind, 10, (32, 32), np.random.default_rng(seed)).reshape(-1, 3).astype(float)
        return np.concatenate([f.mean(0), f.std(0)])
    centres = {k: np.mean([feature(k, s) for s in range(10)], axis=0) for k in demo.KINDS}
    for k in demo.KINDS:
        for s in range(10, 15):
            f = feature(k, s)
            assert min(centres, key=lambda j: np.linalg.norm(f - centres[j])) == k


def all_bytes(folder):
    out = {}
    for dirpath, _, files in os.walk(folder):
        for name in files:
            with open(os.path.join(dirpath, name), 'rb') as f:
                out[os.path.relpath(os.path.join(dirpath, name), folder)] = f.read()
    return out


def test_deterministic_reused_and_regenerated(tmp_path):
    demo.generate(make_args(tmp_path / 'a'))
    demo.generate(make_args(tmp_path / 'b'))
    a, b = all_bytes(tmp_path / 'a'), all_bytes(tmp_path / 'b')
    assert a == b and len(a) == 5 + 2 + 9 + 2
    demo.generate(make_args(tmp_path / 'c', seed=1))
    c = all_bytes(tmp_path / 'c')
    assert all(c[k] != a[k] for k in a if k.startswith('videos'))
    assert any(c[k] != a[k] for k in a if k.startswith('lvu_1.0'))

    # same arguments through the command line: nothing rewritten
    mtimes = {k: os.stat(tmp_path / 'a' / k).st_mtime_ns for k in a}
    cmd = [sys.executable, os.path.join('tools', 'make_demo_data.py'), '--out_dir', str(tmp_path / 'a')]
    cmd += [x for k, v in TINY.items() for x in (f'--{k}', str(v))]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert 'reused' in out
    assert {k: os.stat(tmp_path / 'a' / k).st_mtime_ns for k in a} == mtimes

    # other arguments: regenerated, videos of the earlier run removed
    (tmp_path / 'a' / 'videos' / 'notes.txt').write_text('not ours')
    plan = demo.generate(make_args(tmp_path / 'a', num_videos=3))
    assert sorted(os.listdir(tmp_path / 'a' / 'videos')) == ['demo0000.mp4', 'demo0001.mp4', 'demo0002.mp4',
                                                             'notes.txt']
    assert sorted(os.listdir(tmp_path / 'a' / 'unlabelled')) == ['u0000.mp4', 'u0001.mp4']
    assert all_bytes(tmp_path / 'a')['stamp.json'] != a['stamp.json'] and len(plan) == 5


@pytest.mark.parametrize('overrides, message', [
    (dict(min_segments=1), 'need 2 <= min <= max'),
    (dict(min_segments=8, max_segments=7), 'need 2 <= min <= max'),
    (dict(num_unlabelled=-1), '0 or more'),
    (dict(size='33x24'), 'even'),
    (dict(num_videos=2), 'at least 3'),
])
def test_bad_arguments(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        demo.generate(make_args(tmp_path, **overrides))
    assert not os.path.exists(tmp_path / 'stamp.json')
