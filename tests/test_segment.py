"""Steps 1 and 2 of the preprocessing chain on generated videos (util/synthetic.write_video)."""
import json
import os

import av
import numpy as np
import pandas as pd
import pytest

import prepare_paired_paths as step2
import segment_video_library_movie_clip as step1
from util.embeddings import is_complete, save_video_embeddings
from util.errors import InputError
from util.synthetic import color_frames, rotate_in_header, write_video
from util.video import VideoError, probe_video, segment_windows

COLORS = ((255, 0, 0), (0, 255, 0), (0, 0, 255))  # color_frames' default: one colour per 5 s

# relative path -> (seconds, fps, (width, height), codec)
GOOD = {
    'P03/cam01/P03_cereals.mp4': (12.3, 10, (64, 48), 'libx264'),  # not a multiple of 5 s, nested
    'long.mkv': (10.0, 25, (80, 64), 'libx264'),                    # exact multiple, no frame count in header
    'short.webm': (3.0, 15, (48, 32), 'libvpx-vp9'),                # shorter than one segment
    'tail.avi': (10.5, 10, (64, 48), 'mpeg4'),                      # 0.5 s tail < --min_last_sec: dropped
}
EXPECTED = {  # video id -> segment windows
    'P03-cam01-P03_cereals': [(0.0, 5.0), (5.0, 10.0), (10.0, 12.3)],
    'long': [(0.0, 5.0), (5.0, 10.0)],
    'short': [(0.0, 3.0)],
    'tail': [(0.0, 5.0), (5.0, 10.0)],
}


def run_step1(video_dir, out_dir, *extra):
    args = step1.get_args_parser().parse_args(['--video_dir', str(video_dir), '--output_dir', str(out_dir), *extra])
    return step1.main(args)


def run_step2(*argv):
    return step2.main(step2.get_args_parser().parse_args([str(a) for a in argv]))


@pytest.fixture(scope='module')
def library(tmp_path_factory):
    root = tmp_path_factory.mktemp('videos')
    for rel, (sec, fps, size, codec) in GOOD.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        write_video(root / rel, color_frames(sec, fps=fps, size=size), fps=fps, codec=codec)
    write_video(root / 'tiny.mp4', color_frames(0.5), fps=10)  # shorter than --min_last_sec
    data = (root / 'P03/cam01/P03_cereals.mp4').read_bytes()
    (root / 'broken').mkdir()
    (root / 'broken/corrupt.mp4').write_bytes(data[:len(data) // 2])
    (root / 'empty.mov').write_bytes(b'')
    (root / 'notes.mp4').write_text('not a video\n' * 20)
    (root / 'readme.txt').write_text('ignored: not a video extension')
    return root


@pytest.fixture(scope='module')
def segmented(library, tmp_path_factory):
    out = tmp_path_factory.mktemp('segments')
    run_step1(library, out, '--num_workers', '2')
    return out


def test_segment_windows():
    assert segment_windows(10.0) == [(0.0, 5.0), (5.0, 10.0)]
    assert segment_windows(10.5) == [(0.0, 5.0), (5.0, 10.0)]
    assert segment_windows(11.0) == [(0.0, 5.0), (5.0, 10.0), (10.0, 11.0)]
    assert segment_windows(10.5, min_last_sec=0.5) == [(0.0, 5.0), (5.0, 10.0), (10.0, 10.5)]
    assert segment_windows(3.0) == [(0.0, 3.0)]
    assert segment_windows(0.5) == []
    assert segment_windows(7.0, segment_sec=2.5) == [(0.0, 2.5), (2.5, 5.0), (5.0, 7.0)]
    assert segment_windows(10.0000001, min_last_sec=0) == [(0.0, 5.0), (5.0, 10.0)]  # no empty window


def test_probe(library):
    for rel, (sec, fps, size, _) in GOOD.items():
        info = probe_video(str(library / rel))
        assert info.num_frames == round(sec * fps), rel
        assert info.fps == pytest.approx(fps) and info.duration == pytest.approx(sec, abs=1e-6), rel
        assert (info.width, info.height) == size, rel
    for rel, reason in [('empty.mov', 'empty'), ('notes.mp4', 'not a readable video'),
                        ('broken/corrupt.mp4', 'not a readable video')]:
        with pytest.raises(VideoError, match=reason):
            probe_video(str(library / rel))


def test_segments_csv_and_bad_videos(library, segmented, capsys):
    df = pd.read_csv(segmented / 'segments_metadata.csv', keep_default_na=False)
    assert list(df.columns) == step1.SEGMENT_COLUMNS
    assert list(df.video_id.unique()) == sorted(EXPECTED)  # deterministic order, nested id rule
    for vid, windows in EXPECTED.items():
        rows = df[df.video_id == vid]
        assert list(rows.segment_index) == list(range(len(windows)))
        np.testing.assert_allclose(np.stack([rows.start, rows.end], 1), windows)
        sec, fps, _, _ = next(v for k, v in GOOD.items() if step1.video_id(str(library / k), str(library)) == vid)
        assert set(rows.num_frames) == {round(sec * fps)} and set(rows.fps) == {fps}
        assert rows.duration.iloc[0] == pytest.approx(sec)
        assert all(os.path.isabs(p) and os.path.isfile(p) for p in rows.video_path)
        assert set(rows.segment_path) == {''}  # no --reencode

    bad = pd.read_csv(segmented / 'bad_videos.csv')
    reasons = {os.path.relpath(p, library): r for p, r in zip(bad.video_path, bad.reason)}
    assert set(reasons) == {'tiny.mp4', 'broken/corrupt.mp4', 'empty.mov', 'notes.mp4'}
    assert 'shorter' in reasons['tiny.mp4'] and 'empty file' in reasons['empty.mov']
    assert 'not a readable video' in reasons['notes.mp4'] and 'not a readable video' in reasons['broken/corrupt.mp4']


def test_worker_process_that_dies_fails_its_video_only(library, segmented, tmp_path, monkeypatch):
    """A probing process killed by its video (FFmpeg crashing: SIGSEGV) or by something passing (the
    out-of-memory killer: SIGKILL, once) used to stop step 1 with nothing written: the videos it may
    have been on are now probed again one at a time, and the one that kills its process again is
    listed in bad_videos.csv."""
    import multiprocessing
    import faulthandler
    import signal
    real, once = step1.probe_video, tmp_path / 'killed_once'

    def dying(path):
        if multiprocessing.parent_process() is not None:  # in a worker process only
            if path.endswith('long.mkv'):
                faulthandler.disable()  # pytest's: no traceback dump from the worker
                os.kill(os.getpid(), signal.SIGSEGV)
            if path.endswith('tail.avi') and not once.exists():
                once.touch()
                os.kill(os.getpid(), signal.SIGKILL)
        return real(path)

    monkeypatch.setattr(step1, 'probe_video', dying)
    run_step1(library, tmp_path / 'out', '--num_workers', '2')
    assert once.exists()
    ref = pd.read_csv(segmented / 'segments_metadata.csv', keep_default_na=False)
    got = pd.read_csv(tmp_path / 'out' / 'segments_metadata.csv', keep_default_na=False)
    pd.testing.assert_frame_equal(got, ref[ref.video_id != 'long'].reset_index(drop=True))
    bad = pd.read_csv(tmp_path / 'out' / 'bad_videos.csv')
    reasons = dict(zip(bad.video_path, bad.reason))
    assert len(reasons) == 5 and reasons[str(library / 'long.mkv')].startswith('its process died (')


def test_worker_process_that_dies_while_videos_are_handed_out(library, segmented, tmp_path, monkeypatch):
    """A process that dies before every video has been handed to the pool (the first video crashing
    FFmpeg at once, in a library of thousands): the pool refuses the next ones (BrokenProcessPool from
    submit), which stopped the run; its video fails and the others are probed."""
    import multiprocessing
    import signal
    from concurrent.futures import ProcessPoolExecutor, wait
    real, first = step1.probe_video, str(library / 'P03/cam01/P03_cereals.mp4')

    def dying(path):
        if multiprocessing.parent_process() is not None and path == first:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(path)

    class Pool(ProcessPoolExecutor):  # the first pool breaks after its first video is handed out
        broke = []

        def submit(self, *args, **kwargs):
            future = super().submit(*args, **kwargs)
            if not self.broke:
                self.broke.append(wait([future], timeout=30))
            return future

    monkeypatch.setattr(step1, 'probe_video', dying)
    monkeypatch.setattr(step1, 'ProcessPoolExecutor', Pool)
    run_step1(library, tmp_path / 'out', '--num_workers', '2')
    ref = pd.read_csv(segmented / 'segments_metadata.csv', keep_default_na=False)
    got = pd.read_csv(tmp_path / 'out' / 'segments_metadata.csv', keep_default_na=False)
    pd.testing.assert_frame_equal(got, ref[ref.video_path != first].reset_index(drop=True))
    bad = pd.read_csv(tmp_path / 'out' / 'bad_videos.csv')
    reasons = dict(zip(bad.video_path, bad.reason))
    assert len(reasons) == 5 and reasons[first].startswith('its process died (')


def test_reencode_process_that_dies_leaves_no_temporary_file(tmp_path, monkeypatch):
    """--reencode: a process killed while writing a segment file leaves its temporary file (nothing in
    it runs after a kill); the video is re-encoded again (in the same run) and that file is removed
    then (it used to stay for good, also through later runs)."""
    import multiprocessing
    import signal
    from util import video
    for name, sec in (('a', 6.0), ('b', 3.0)):
        (tmp_path / 'v').mkdir(exist_ok=True)
        write_video(tmp_path / 'v' / f'{name}.mp4', color_frames(sec), fps=10)
    real, once = video._encode, tmp_path / 'killed_once'

    def dying(tmp, *args):
        if multiprocessing.parent_process() is not None and '/a/5-' in tmp and not once.exists():
            once.touch()
            with open(tmp, 'wb') as f:
                f.write(b'half a file')
            os.kill(os.getpid(), signal.SIGKILL)
        return real(tmp, *args)

    monkeypatch.setattr(video, '_encode', dying)
    segments, bad = run_step1(tmp_path / 'v', tmp_path / 'out', '--reencode', '--num_workers', '1')
    assert once.exists() and not bad and len(segments) == 3
    assert sorted(p.relative_to(tmp_path / 'out').as_posix() for p in (tmp_path / 'out').rglob('*') if p.is_file()) == [
        'a/0-5/video.mp4', 'a/5-6/video.mp4', 'b/0-3/video.mp4', 'bad_videos.csv', 'segments_metadata.csv']


def test_summary_and_in_process_run_agree(library, segmented, tmp_path, capsys):
    run_step1(library, tmp_path, '--num_workers', '0')
    out = capsys.readouterr().out
    assert '8 found, 4 segmented into 8 segments' in out and '4 skipped' in out and 'empty file' in out
    for name in ('segments_metadata.csv', 'bad_videos.csv'):
        assert (tmp_path / name).read_bytes() == (segmented / name).read_bytes()


def test_truncated_with_index_first(tmp_path):
    """An mp4 whose index precedes the data opens fine when truncated: the packet count catches it."""
    path = tmp_path / 'faststart.mp4'
    with av.open(str(path), 'w', options={'movflags': 'faststart'}) as c:
        s = c.add_stream('libx264', rate=10)
        s.width, s.height, s.pix_fmt = 64, 48, 'yuv420p'
        for f in color_frames(6):
            for p in s.encode(av.VideoFrame.from_ndarray(f, format='rgb24')):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    assert probe_video(str(path)).num_frames == 60
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])
    with pytest.raises(VideoError, match='truncated'):
        probe_video(str(path))


def test_metadata_that_is_not_utf8(tmp_path):
    """A title tag in Latin-1 (old AVI and Matroska files) does not make the video unreadable, in step 1
    nor in step 3."""
    from util.frames import decode_segments
    path = tmp_path / 'v' / 'latin.mkv'
    path.parent.mkdir()
    write_video(path, color_frames(3), fps=10)
    with av.open(str(path)) as c:
        tags = c.metadata
    data = path.read_bytes()
    i = data.rindex(tags['ENCODER'].encode())  # the tag, not the header's muxing application
    path.write_bytes(data[:i] + b'caf\xe9' + data[i + 4:])  # the tag's first 4 bytes, same length
    segments, bad = run_step1(path.parent, tmp_path / 'out', '--reencode', '--num_workers', '0')
    assert not bad and [(r['start'], r['end']) for r in segments] == [(0.0, 3.0)]
    assert len(_decode(segments[0]['segment_path'])) == 30
    assert [k for k, _ in decode_segments(str(path), [(0.0, 3.0)])] == [0]


def test_video_id_collision(tmp_path):
    (tmp_path / 'v').mkdir()
    for name in ('a.mp4', 'a.mkv'):
        write_video(tmp_path / 'v' / name, color_frames(1), fps=10)
    with pytest.raises(InputError, match='same video id') as e:
        run_step1(tmp_path / 'v', tmp_path / 'out', '--num_workers', '0')
    assert 'a.mp4' in str(e.value) and 'a.mkv' in str(e.value)
    assert not (tmp_path / 'out' / 'segments_metadata.csv').exists()


def test_out_dir_inside_video_dir_is_not_searched(tmp_path):
    write_video(tmp_path / 'clip.mp4', color_frames(6), fps=10)
    for _ in range(2):
        segments, bad = run_step1(tmp_path, tmp_path / 'segments', '--reencode', '--num_workers', '0')
        assert [r['video_id'] for r in segments] == ['clip', 'clip'] and not bad


def test_error_of_one_video_does_not_stop_the_others(tmp_path):
    """A segment folder whose name the file system refuses (here a video id past 255 bytes) is that
    video's failure, listed in bad_videos.csv; the other videos are written (it used to stop the run)."""
    deep = tmp_path / 'v' / ('d' * 100) / ('d' * 100) / ('d' * 100)
    deep.mkdir(parents=True)
    write_video(deep / 'x.mp4', color_frames(3), fps=10)
    write_video(tmp_path / 'v' / 'ok.mp4', color_frames(3), fps=10)
    segments, bad = run_step1(tmp_path / 'v', tmp_path / 'out', '--reencode', '--num_workers', '2')
    assert [r['video_id'] for r in segments] == ['ok']
    assert len(bad) == 1 and bad[0]['video_path'] == str(deep / 'x.mp4') and 'OSError' in bad[0]['reason']
    assert pd.read_csv(tmp_path / 'out' / 'bad_videos.csv')['video_path'].tolist() == [str(deep / 'x.mp4')]


def test_linked_folders_are_searched_once(tmp_path):
    """A folder linked into --video_dir (datasets often are) is searched; a link back up is no loop, and
    a folder reached through two links gives its videos once."""
    (tmp_path / 'v').mkdir()
    (tmp_path / 'elsewhere').mkdir()
    write_video(tmp_path / 'elsewhere' / 'clip.mp4', color_frames(3), fps=10)
    write_video(tmp_path / 'v' / 'own.mp4', color_frames(3), fps=10)
    os.symlink(tmp_path / 'elsewhere', tmp_path / 'v' / 'linked')
    os.symlink(tmp_path / 'elsewhere', tmp_path / 'v' / 'linked_too')
    os.symlink(tmp_path / 'v', tmp_path / 'elsewhere' / 'up')
    videos = step1.find_videos(str(tmp_path / 'v'), ['mp4'])
    v = tmp_path / 'v'
    assert videos == {'linked-clip': str(v / 'linked' / 'clip.mp4'), 'own': str(v / 'own.mp4')}


def test_hidden_files_and_folders_are_skipped(tmp_path):
    """macOS's ``._<name>`` companions of copied files and hidden folders (a trash) are not videos of the
    dataset."""
    v = tmp_path / 'v'
    (v / '.Trash-1000').mkdir(parents=True)
    write_video(v / 'clip.mp4', color_frames(3), fps=10)
    write_video(v / '.Trash-1000' / 'old.mp4', color_frames(3), fps=10)
    (v / '._clip.mp4').write_bytes(b'\x00\x05\x16\x07' + bytes(60))  # AppleDouble header, not a video
    assert step1.find_videos(str(v), ['mp4']) == {'clip': str(v / 'clip.mp4')}


def _decode(path):
    with av.open(str(path)) as c:
        return [(f.key_frame, f.to_ndarray(format='rgb24')) for f in c.decode(video=0)]


def test_reencode(library, tmp_path):
    out = tmp_path / 'seg'
    segments, _ = run_step1(library, out, '--reencode', '--num_workers', '0')
    assert len(segments) == 8
    for row in segments:
        path = row['segment_path']
        start, end = row['start'], row['end']
        assert path == str(out / row['video_id'] / f'{start:g}-{end:g}' / 'video.mp4')
        frames = _decode(path)
        assert len(frames) == round((end - start) * row['fps'])  # exactly the window's frames
        assert frames[0][0]  # starts with a keyframe
        first_color = frames[0][1].reshape(-1, 3).mean(0)
        np.testing.assert_allclose(first_color, COLORS[int(start // 5) % 3], atol=20)  # the right window
    assert (out / 'P03-cam01-P03_cereals' / '10-12.3' / 'video.mp4').is_file()
    df = pd.read_csv(out / 'segments_metadata.csv', keep_default_na=False)
    assert list(df.segment_path) == [r['segment_path'] for r in segments]

    # a rerun keeps complete files and writes only the missing one
    stamp = {r['segment_path']: os.stat(r['segment_path']).st_mtime_ns for r in segments}
    removed = segments[1]['segment_path']
    os.remove(removed)
    run_step1(library, out, '--reencode', '--num_workers', '0')
    assert os.path.isfile(removed) and len(_decode(removed)) == 50
    assert all(os.stat(p).st_mtime_ns == t for p, t in stamp.items() if p != removed)
    assert not list(out.rglob('*.tmp'))


def test_job_file_and_complete_outputs(segmented, tmp_path, capsys):
    csv = segmented / 'segments_metadata.csv'
    emb_dir = tmp_path / 'emb'
    run_step2('--segments_csv', csv, '--embedding_dir', emb_dir)
    doc = json.loads((segmented / 'paired_paths.json').read_text())
    assert doc['version'] == 1 and doc['segment_sec'] == 5.0 and doc['embedding_dir'] == str(emb_dir)
    jobs = {j['video_id']: j for j in doc['jobs']}
    assert list(jobs) == sorted(EXPECTED)
    cereals = jobs['P03-cam01-P03_cereals']
    assert cereals['output_path'] == str(emb_dir / 'P03-cam01-P03_cereals.safetensors')
    assert cereals['num_frames'] == 123 and cereals['fps'] == 10.0 and cereals['duration'] == pytest.approx(12.3)
    assert cereals['video_path'].endswith('P03/cam01/P03_cereals.mp4')
    assert [(s['index'], s['start'], s['end'], s['path']) for s in cereals['segments']] == \
        [(0, 0.0, 5.0, None), (1, 5.0, 10.0, None), (2, 10.0, 12.3, None)]

    # simulate step 3: one complete store, one with a missing segment, one unreadable
    def store(vid, windows):
        s, e = zip(*windows)
        save_video_embeddings(jobs[vid]['output_path'], np.random.default_rng(0).normal(size=(len(s), 8)), s, e)
    store('long', EXPECTED['long'])
    store('tail', EXPECTED['tail'][:1])
    (emb_dir / 'short.safetensors').write_bytes(b'half a file')
    assert is_complete(jobs['long']['output_path'], jobs['long']['segments'])
    assert not is_complete(jobs['tail']['output_path'], jobs['tail']['segments'])
    assert not is_complete(jobs['short']['output_path'], jobs['short']['segments'])
    assert not is_complete(jobs['long']['output_path'], jobs['tail']['segments'][:1] * 2)  # other times
    out_json = tmp_path / 'rerun.json'
    run_step2('--segments_csv', csv, '--embedding_dir', emb_dir, '--out_json', out_json)
    assert [j['video_id'] for j in json.loads(out_json.read_text())['jobs']] == \
        ['P03-cam01-P03_cereals', 'short', 'tail']
    assert '1 already complete' in capsys.readouterr().out


def test_reencoded_paths_in_jobs(library, tmp_path):
    out = tmp_path / 'seg'
    run_step1(library, out, '--reencode', '--num_workers', '0', '--extensions', 'webm')
    run_step2('--segments_csv', out / 'segments_metadata.csv', '--embedding_dir', tmp_path / 'emb')
    (job,) = json.loads((out / 'paired_paths.json').read_text())['jobs']
    assert job['segments'][0]['path'] == str(out / 'short' / '0-3' / 'video.mp4')


def test_shards(tmp_path):
    rng = np.random.default_rng(0)
    rows = []
    for v in range(23):
        n = int(rng.integers(1, 30))
        rows += [dict(video_id=f'v{v:02d}', video_path=f'/data/v{v:02d}.mp4', segment_index=k, start=5.0 * k,
                      end=5.0 * k + 5, num_frames=n * 50, fps=10.0, duration=5.0 * n, segment_path='')
                 for k in range(n)]
    csv = tmp_path / 'segments_metadata.csv'
    pd.DataFrame(rows).to_csv(csv, index=False)
    run_step2('--segments_csv', csv, '--embedding_dir', tmp_path / 'emb', '--num_shards', 4)
    shards = [json.loads((tmp_path / f'paired_paths_{k}of4.json').read_text())['jobs'] for k in range(4)]
    ids = [j['video_id'] for s in shards for j in s]
    assert sorted(ids) == [f'v{v:02d}' for v in range(23)]  # every job exactly once
    loads = [sum(len(j['segments']) for j in s) for s in shards]
    assert sum(loads) == len(rows)
    assert max(loads) - min(loads) <= max(len(j['segments']) for s in shards for j in s)
    assert all([j['video_id'] for j in s] == sorted(j['video_id'] for j in s) for s in shards)
    assert not (tmp_path / 'paired_paths.json').exists()


def test_relative_paths_of_a_segments_csv_are_its_folders(tmp_path, monkeypatch):
    """A hand-written segments CSV with relative paths: the job file holds them resolved against the
    CSV's folder (as dataset CSVs are read), not against the folder step 3 runs in."""
    folder = tmp_path / 'data'
    folder.mkdir()
    pd.DataFrame(dict(video_id=['a', 'a'], video_path=['videos/a.mp4'] * 2, segment_index=[0, 1],
                      start=[0.0, 5.0], end=[5.0, 9.0], num_frames=[90, 90], fps=[10.0, 10.0],
                      duration=[9.0, 9.0], segment_path=['seg/a/0-5/video.mp4', ''])).to_csv(folder / 's.csv', index=False)
    monkeypatch.chdir(tmp_path)
    run_step2('--segments_csv', 'data/s.csv', '--embedding_dir', 'emb')
    (job,) = json.loads((folder / 'paired_paths.json').read_text())['jobs']
    assert job['video_path'] == str(folder / 'videos' / 'a.mp4')
    assert [s['path'] for s in job['segments']] == [str(folder / 'seg' / 'a' / '0-5' / 'video.mp4'), None]


@pytest.mark.parametrize('edit, message', [
    (lambda df: df.drop(columns=['end']), r"missing column\(s\) \['end'\]"),
    (lambda df: df.assign(start=['0', 'five']), r"row 2 \(line 3\): start 'five' is not a finite float"),
    (lambda df: df.assign(end=['5', '4']), r'row 2 \(line 3\): end 4.0 is not after start 5.0'),
    (lambda df: df.assign(segment_index=[0, 0]), r'segment indices \[0, 0\]'),
])
def test_malformed_segments_csv(tmp_path, edit, message):
    df = pd.DataFrame(dict(video_id=['a', 'a'], video_path=['/x/a.mp4'] * 2, segment_index=[0, 1], start=[0.0, 5.0],
                           end=[5.0, 9.0], num_frames=[90, 90], fps=[10.0, 10.0], duration=[9.0, 9.0],
                           segment_path=['', '']))
    csv = tmp_path / 'bad.csv'
    edit(df).to_csv(csv, index=False)
    with pytest.raises(step2.SegmentsError, match=message) as e:
        run_step2('--segments_csv', csv, '--embedding_dir', tmp_path / 'emb')
    assert str(csv) in str(e.value)


def _with_audio(path, video_sec, audio_sec, fps=10, cover=False):
    """A video whose first stream is audio (silence), which may run longer than the video; ``cover``: a
    cover picture (one-frame video stream) before the video stream; ``video_sec`` 0: no video."""
    with av.open(str(path), 'w') as c:
        audio = c.add_stream('aac', rate=16000)
        if cover:
            art = c.add_stream('mjpeg')
            art.width, art.height, art.pix_fmt = 32, 32, 'yuvj420p'
            art.disposition = av.stream.Disposition.attached_pic
        if video_sec:
            video = c.add_stream('libx264', rate=fps)
            video.width, video.height, video.pix_fmt = 64, 48, 'yuv420p'
        if cover:
            for p in [*art.encode(av.VideoFrame.from_ndarray(np.zeros((32, 32, 3), np.uint8), format='rgb24')),
                      *art.encode()]:
                c.mux(p)
        if video_sec:
            for f in color_frames(video_sec, fps=fps):
                for p in video.encode(av.VideoFrame.from_ndarray(f, format='rgb24')):
                    c.mux(p)
            for p in video.encode():
                c.mux(p)
        for k in range(0, int(audio_sec * 16000), 1024):
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format='fltp', layout='mono')
            frame.sample_rate, frame.pts = 16000, k
            for p in audio.encode(frame):
                c.mux(p)
        for p in audio.encode():
            c.mux(p)


def test_audio_stream_first_and_longer_than_video(tmp_path):
    """The video stream's own length counts: audio running 4 s longer is no truncation; a Matroska file
    cut in half (audio and video) is."""
    _with_audio(tmp_path / 'a.mp4', 8, 12)
    info = probe_video(str(tmp_path / 'a.mp4'))
    assert (info.num_frames, info.duration) == (80, pytest.approx(8.0))
    _with_audio(tmp_path / 'b.mkv', 12, 12)
    assert probe_video(str(tmp_path / 'b.mkv')).duration == pytest.approx(12.0)
    data = (tmp_path / 'b.mkv').read_bytes()
    (tmp_path / 'b.mkv').write_bytes(data[:len(data) // 2])
    with pytest.raises(VideoError, match='truncated'):
        probe_video(str(tmp_path / 'b.mkv'))


def test_cover_picture_is_not_the_video(tmp_path):
    """A cover picture (FFmpeg lists it as a one-frame video stream) is never taken for the video: before
    the video stream it is passed over (steps 1 and 3); an audio file with one has no video stream."""
    from util.frames import decode_segments
    _with_audio(tmp_path / 'a.mp4', 8, 8, cover=True)
    info = probe_video(str(tmp_path / 'a.mp4'))
    assert (info.num_frames, info.duration, info.width) == (80, pytest.approx(8.0), 64)
    assert [x.shape for _, x in decode_segments(str(tmp_path / 'a.mp4'), [(0.0, 5.0), (5.0, 8.0)], raw=True)] \
        == [(8, 48, 64, 3)] * 2
    _with_audio(tmp_path / 'song.mp4', 0, 3, cover=True)
    with pytest.raises(VideoError, match='no video stream'):
        probe_video(str(tmp_path / 'song.mp4'))


def test_frames_without_timestamps_are_timed_by_position(tmp_path):
    """Matroska gives no timestamp to the frames before time 0 (a file cut with its timestamps kept):
    step 3 then times every frame by its position, so step 1 does too: the duration is frames / fps
    (it used to span the timed frames only, leaving the rest of the video out) and --reencode cuts
    the windows by position."""
    from fractions import Fraction
    from util.video import reencode_segments
    path = str(tmp_path / 'cut.mkv')
    with av.open(path, 'w', options={'avoid_negative_ts': 'disabled'}) as c:
        s = c.add_stream('libx264', rate=10)
        s.width, s.height, s.pix_fmt = 64, 48, 'yuv420p'
        s.codec_context.time_base = Fraction(1, 1000)
        for i, f in enumerate(color_frames(8.0)):
            frame = av.VideoFrame.from_ndarray(f, format='rgb24')
            frame.pts, frame.time_base = i * 100 - 3000, Fraction(1, 1000)  # starts at -3 s
            for p in s.encode(frame):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    with av.open(path) as c:
        assert sum(p.pts is None for p in c.demux(c.streams.video[0]) if p.size) == 30
    info = probe_video(path)
    assert (info.num_frames, info.duration, info.timed) == (80, 8.0, False)
    windows = segment_windows(info.duration)
    outs = [str(tmp_path / f'{k}.mp4') for k in range(len(windows))]
    assert reencode_segments(path, windows, outs, timed=info.timed) == [50, 30]


def test_avi_with_dropped_frames_is_not_truncated(tmp_path):
    """AVI stores a dropped frame as an empty chunk: counted in the header, never demuxed."""
    path = str(tmp_path / 'drop.avi')
    with av.open(path, 'w') as c:
        s = c.add_stream('mpeg4', rate=10)
        s.width, s.height, s.pix_fmt = 64, 48, 'yuv420p'
        for i, f in enumerate(color_frames(12)):
            if i % 10 == 5:
                p = av.Packet(b'')
                p.stream, p.pts, p.dts, p.time_base = s, i, i, s.time_base
                c.mux(p)
                continue
            frame = av.VideoFrame.from_ndarray(f, format='rgb24')
            frame.pts = i
            for p in s.encode(frame):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    info = probe_video(path)
    assert (info.num_frames, info.duration) == (108, pytest.approx(12.0))


def test_empty_video_folder_is_an_error(tmp_path):
    (tmp_path / 'videos').mkdir()
    (tmp_path / 'videos' / 'notes.txt').write_text('no video here')
    with pytest.raises(InputError, match='no video files'):
        run_step1(tmp_path / 'videos', tmp_path / 'out', '--num_workers', '0')
    assert not (tmp_path / 'out').exists()


def test_strict_and_out_dir_alias(library, segmented, tmp_path, capsys):
    """--out_dir is still accepted; --strict exits 1 after writing both CSVs; the count is printed last."""
    args = step1.get_args_parser().parse_args(['--video_dir', str(library), '--out_dir', str(tmp_path),
                                               '--num_workers', '0', '--strict'])
    with pytest.raises(SystemExit) as e:
        step1.main(args)
    assert e.value.code == 1
    assert (tmp_path / 'bad_videos.csv').read_bytes() == (segmented / 'bad_videos.csv').read_bytes()
    assert '4 skipped (listed in' in capsys.readouterr().out.strip().splitlines()[-1]


def test_is_complete_checks_the_encoder(tmp_path):
    """A file of another encoder (or random weights for real ones) is not complete for this encoder;
    the same checkpoint typed as another path is."""
    segs = [dict(start=0.0, end=5.0), dict(start=5.0, end=9.0)]
    path = str(tmp_path / 'v.safetensors')
    save_video_embeddings(path, np.ones((2, 4)), [0, 5], [5, 9],
                          {'model': 'checkpoints/LanguageBind_Video_Huge_V1.5_FT', 'random_init': '0'})
    assert is_complete(path, segs)  # no encoder given: rows and times only
    assert is_complete(path, segs, '/abs/path/LanguageBind_Video_Huge_V1.5_FT/', False)
    assert is_complete(path, segs, 'LanguageBind/LanguageBind_Video_Huge_V1.5_FT', False)
    assert not is_complete(path, segs, 'checkpoints/LanguageBind_Video_FT', False)
    assert not is_complete(path, segs, 'checkpoints/LanguageBind_Video_Huge_V1.5_FT', True)


def test_reencode_turns_rotated_videos_upright(tmp_path):
    """As the original release's ffmpeg re-encoding: a phone's upright video gives upright segment files."""
    (tmp_path / 'v').mkdir()
    write_video(tmp_path / 'plain.mp4', color_frames(2.0, size=(96, 64)), fps=10)
    rotate_in_header(tmp_path / 'plain.mp4', tmp_path / 'v' / 'phone.mp4')
    segments, bad = run_step1(tmp_path / 'v', tmp_path / 'out', '--reencode', '--num_workers', '0')
    assert not bad and len(segments) == 1
    with av.open(segments[0]['segment_path']) as c:
        frames = list(c.decode(video=0))
    with av.open(str(tmp_path / 'plain.mp4')) as c:
        first = next(c.decode(video=0)).to_ndarray(format='rgb24')
    assert len(frames) == 20 and (frames[0].width, frames[0].height) == (64, 96) and not frames[0].rotation
    turned = np.rot90(first, k=-1).astype(int)  # clockwise
    assert np.abs(frames[0].to_ndarray(format='rgb24').astype(int) - turned).mean() < 6  # H.264 is lossy


def test_unwritable_output_folder_is_an_error(library, tmp_path):
    """Step 1 checks --output_dir before probing (here a file stands where the folder should be);
    step 2 names a job file it cannot write."""
    (tmp_path / 'taken').write_text('a file, not a folder')
    with pytest.raises(InputError, match='--output_dir .*taken: cannot write there'):
        run_step1(library, tmp_path / 'taken', '--num_workers', '0')
    csv = tmp_path / 'seg.csv'
    pd.DataFrame([dict(video_id='a', video_path='/x/a.mp4', segment_index=0, start=0.0, end=5.0, num_frames=50,
                       fps=10.0, duration=5.0, segment_path='')]).to_csv(csv, index=False)
    with pytest.raises(InputError, match='taken/jobs.json: cannot write the job file'):
        run_step2('--segments_csv', csv, '--embedding_dir', tmp_path / 'emb', '--out_json', tmp_path / 'taken' / 'jobs.json')
