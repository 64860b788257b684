"""Step 3 (langbind_preprocessing.py): frames and embeddings against the languagebind package's own
code, and end-to-end runs on a hand-written job file (determinism, resume, bad videos)."""
import json
import os
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

import langbind_preprocessing as step3
from util.errors import InputError
from util.embeddings import load_video_embeddings, read_metadata, save_video_embeddings
from util.frames import decode_segments, frame_indices
from util.langbind import VideoEncoder, import_languagebind, load_encoder, load_languagebind
from util.synthetic import color_frames, write_video

# video id -> (seconds, fps, (width, height), file name); windows of 5 s as step 1 cuts them
VIDEOS = {
    'a': (12.3, 10, (64, 48), 'a.mp4'),       # last window 10-12.3 s
    'b': (7.0, 25, (48, 64), 'b.mkv'),        # portrait (resize by width), no frame count in header
    'c': (3.0, 15, (80, 48), 'c.mp4'),        # shorter than one segment
    'trunc': (12.0, 10, (64, 48), 'trunc.mkv'),  # cut at ~half: decodes, then stops mid-way
}

TINY = {'model': 'random_init:tiny', 'random_init': '1'}  # metadata of the test encoder's files


def windows(seconds):
    return [(float(s), float(min(s + 5, seconds))) for s in np.arange(0, seconds, 5.0) if min(s + 5, seconds) - s >= 1]


@pytest.fixture(scope='module')
def library(tmp_path_factory):
    root = tmp_path_factory.mktemp('videos')
    for vid, (sec, fps, size, name) in VIDEOS.items():
        write_video(root / name, color_frames(sec, fps=fps, size=size, seed=len(vid)), fps=fps)
    data = (root / 'trunc.mkv').read_bytes()
    (root / 'trunc.mkv').write_bytes(data[:len(data) // 2])
    (root / 'garbage.mp4').write_bytes(os.urandom(4000))
    return root


def write_jobs(library, emb_dir, path):
    """A job file as prepare_paired_paths.py writes it (contract version 1)."""
    jobs = []
    for vid, (sec, fps, _, name) in [*VIDEOS.items(), ('garbage', (6.0, 10, None, 'garbage.mp4'))]:
        segs = [dict(index=k, start=s, end=e, path=None) for k, (s, e) in enumerate(windows(sec))]
        jobs.append(dict(video_id=vid, video_path=str(library / name), output_path=str(emb_dir / f'{vid}.safetensors'),
                         fps=float(fps), num_frames=int(sec * fps), duration=sec, segments=segs))
    path.write_text(json.dumps(dict(version=1, segment_sec=5.0, embedding_dir=str(emb_dir), jobs=jobs)))
    return path


def run(job_file, *extra):
    args = step3.get_args_parser().parse_args(['--video_path_file', str(job_file), '--random_init', 'tiny',
                                               '--batch_size', '4', *extra])
    return step3.main(args)


def test_frames_match_languagebind_processor(tmp_path):
    """Whole file: our frames == LanguageBindVideoProcessor (decord backend) with its flip removed."""
    lb = import_languagebind()
    path = str(tmp_path / 'v.mp4')
    write_video(path, color_frames(3.3, fps=10, size=(96, 160), seed=3), fps=10)  # portrait, 33 frames
    proc = lb.LanguageBindVideoProcessor(lb.LanguageBindVideoConfig(vision_config=dict(num_frames=8)))
    assert proc.config.vision_config.video_decode_backend == 'decord'
    steps = proc.transform.transforms
    proc.transform.transforms = [t for t in steps if 'Flip' not in type(t).__name__]
    assert len(proc.transform.transforms) == len(steps) - 1
    ref = proc(images=path)['pixel_values'][0]
    (k, ours), = decode_segments(path)
    assert k == 0 and ours.shape == ref.shape == (3, 8, 224, 224)
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=0)


def test_window_frames_match_decord(library):
    """Segment k of a long video: the 8 frames spread first to last over the frames whose time lies
    in [start, end), equal to decord's frames at those indices through the package's transform."""
    import decord
    lb = import_languagebind()
    sec, fps, _, name = VIDEOS['a']
    path, wins = str(library / name), windows(sec)
    transform = lb.LanguageBindVideoProcessor(lb.LanguageBindVideoConfig(vision_config=dict(num_frames=8))).transform
    transform.transforms = [t for t in transform.transforms if 'Flip' not in type(t).__name__]
    vr = decord.VideoReader(path)
    ours = list(decode_segments(path, wins))
    assert [k for k, _ in ours] == list(range(len(wins)))
    for (k, x), (s, e) in zip(ours, wins):
        frames = [i for i in range(len(vr)) if s <= i / fps < e]
        idx = [frames[i] for i in frame_indices(len(frames))]
        ref = transform(vr.get_batch(idx).permute(3, 0, 1, 2))
        torch.testing.assert_close(x, ref, atol=1e-4, rtol=0)
    assert frame_indices(50).tolist() == [0, 7, 14, 21, 28, 35, 42, 49]


def test_embedding_matches_package(library, tmp_path):
    model = load_languagebind(random_init='tiny')
    x = torch.stack([x for _, x in decode_segments(str(library / 'a.mp4'), windows(12.3))])
    with torch.no_grad():
        ref = F.normalize(model.get_image_features(pixel_values=x), dim=-1)
        ours = VideoEncoder(model)(x)
        assert ours.shape == (3, 64)
        torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)
        again = load_encoder(random_init='tiny')(x)  # fixed seed: same weights every time
        assert torch.equal(again, ours)
        model.save_pretrained(tmp_path / 'ckpt')  # a local checkpoint folder loads (shims applied)
        torch.testing.assert_close(load_encoder(str(tmp_path / 'ckpt'))(x), ours, atol=1e-6, rtol=0)
    with pytest.raises(InputError, match="(?s)huggingface-cli download .*--model_path"):
        load_encoder(str(tmp_path / 'no_such_checkpoint'))


def test_end_to_end_resume_and_bad_videos(library, tmp_path, capsys):
    emb1, emb2, emb3 = tmp_path / 'e1', tmp_path / 'e2', tmp_path / 'e3'
    end = tmp_path / 'done.json'
    summary = run(write_jobs(library, emb1, tmp_path / 'j1.json'), '--num_workers', '2', '--end_job_file', str(end))
    out = capsys.readouterr().out
    assert summary['written'] == 3 and summary['failed'] == 2 and summary['segments'] == 6
    assert json.loads(end.read_text()) == summary
    # the truncated video is reported with file and segment, the garbage file with its path
    assert f'{library / "trunc.mkv"}: segment 0 [0-5 s]: the frames end at' in out
    assert f'{library / "garbage.mp4"}' in out
    assert sorted(os.listdir(emb1)) == ['a.safetensors', 'b.safetensors', 'c.safetensors', 'failed_j1.csv']
    failures = pd.read_csv(emb1 / 'failed_j1.csv')
    assert failures['video_id'].tolist() == ['garbage', 'trunc'] and summary['failures_file'] == str(emb1 / 'failed_j1.csv')
    assert 'the frames end at' in failures['reason'][1]
    assert out.strip().splitlines()[-1] == f'2 video(s) failed, listed in {emb1 / "failed_j1.csv"}'  # the count last

    encoder = load_encoder(random_init='tiny')
    for vid in ['a', 'b', 'c']:
        sec, _, _, name = VIDEOS[vid]
        emb, starts, ends = load_video_embeddings(str(emb1 / f'{vid}.safetensors'), with_times=True)
        assert [(s, e) for s, e in zip(starts.tolist(), ends.tolist())] == windows(sec)
        torch.testing.assert_close(emb.norm(dim=-1), torch.ones(len(emb)), atol=1e-3, rtol=0)
        with torch.no_grad():
            direct = encoder(torch.stack([x for _, x in decode_segments(str(library / name), windows(sec))]))
        torch.testing.assert_close(emb, direct, atol=2e-3, rtol=0)  # stored as float16
        meta = read_metadata(str(emb1 / f'{vid}.safetensors'))
        assert meta['random_init'] == '1' and meta['model'] == 'random_init:tiny' and meta['video_id'] == vid
        assert meta['num_frames_per_segment'] == '8' and float(meta['segment_sec']) == 5.0

    # a second run, other batching (no workers): bitwise identical files
    run(write_jobs(library, emb2, tmp_path / 'j2.json'), '--num_workers', '0')
    for vid in ['a', 'b', 'c']:
        assert (emb2 / f'{vid}.safetensors').read_bytes() == (emb1 / f'{vid}.safetensors').read_bytes()

    # resume after a kill: one file finished, one half-written temporary file, one stale bad file
    emb3.mkdir()
    shutil.copy(emb1 / 'a.safetensors', emb3 / 'a.safetensors')
    mtime = os.path.getmtime(emb3 / 'a.safetensors')
    (emb3 / '.b.safetensors.k1ll3d.tmp').write_bytes(b'partial')
    os.utime(emb3 / '.b.safetensors.k1ll3d.tmp', (mtime - 3600, mtime - 3600))  # from a run killed an hour ago
    save_video_embeddings(str(emb3 / 'c.safetensors'), torch.ones(5, 64), [0] * 5, [1] * 5, TINY)  # wrong rows
    capsys.readouterr()
    summary = run(write_jobs(library, emb3, tmp_path / 'j3.json'), '--num_workers', '1')
    assert summary['already_complete'] == 1 and summary['written'] == 2
    assert os.path.getmtime(emb3 / 'a.safetensors') == mtime
    assert sorted(os.listdir(emb3)) == ['a.safetensors', 'b.safetensors', 'c.safetensors', 'failed_j3.csv']
    for vid in ['a', 'b', 'c']:
        assert (emb3 / f'{vid}.safetensors').read_bytes() == (emb1 / f'{vid}.safetensors').read_bytes()
