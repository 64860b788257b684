"""Step 3 (langbind_preprocessing.py): frames and embeddings against the languagebind package's own
code, and end-to-end runs on a hand-written job file (determinism, resume, bad videos)."""
import json
import os
import re
import shutil
import time

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

import langbind_preprocessing as step3
from util.errors import InputError
from util.embeddings import load_video_embeddings, read_metadata, save_video_embeddings
from util import frames
from util.frames import decode_segments, frame_indices, transform
from models_langbind import VideoConfig, VideoEncoder
from util.langbind import RANDOM_CONFIGS, checkpoint_key, import_languagebind, load_encoder, package_model
from util.synthetic import color_frames, cut_with_edit_list, moving_texture_frames, rotate_in_header, write_video

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
        in_window = [i for i in range(len(vr)) if s <= i / fps < e]
        idx = [in_window[i] for i in frame_indices(len(in_window))]
        ref = transform(vr.get_batch(idx).permute(3, 0, 1, 2))
        torch.testing.assert_close(x, ref, atol=1e-4, rtol=0)
    assert frame_indices(50).tolist() == [0, 7, 14, 21, 28, 35, 42, 49]


# architecture variants a checkpoint's config.json can select (the real Huge: 'vl', gelu, no LoRA)
VARIANTS = {'vl': {}, 'vl_new+lora+gelu_new': dict(clip_type='vl_new', lora_r=2, hidden_act='gelu_new'),
            'gelu': dict(hidden_act='gelu', lora_r=4), 'silu+eps+heads': dict(hidden_act='silu', layer_norm_eps=1e-3,
                                                                              num_attention_heads=4, lora_r=3, lora_alpha=5)}


def package_pair(variant):
    """The package's model for a variant and our encoder with its weights. Every weight is perturbed:
    the package initialises biases to 0, layer norms to 1 and LoRA's B to 0, under which a bias left out
    or one layer norm used in place of another would go unnoticed."""
    config = VideoConfig(**{**RANDOM_CONFIGS['tiny'], **VARIANTS[variant]})
    torch.manual_seed(1)
    ref = package_model(config)
    with torch.no_grad():
        for k, v in ref.state_dict().items():
            if v.is_floating_point():
                v.add_(torch.randn_like(v) * (1.0 if 'lora_B' in k else 0.1))
    ours = VideoEncoder(config).eval()
    weights = {checkpoint_key(k): v for k, v in ref.state_dict().items()}
    ours.load_state_dict({k: weights[k] for k in ours.state_dict()})
    return ref, ours


@pytest.fixture(scope='module')
def segments(library):
    return torch.stack([x for _, x in decode_segments(str(library / 'a.mp4'), windows(12.3))])


@pytest.mark.parametrize('variant', VARIANTS)
def test_encoder_equals_package(variant, segments):
    """models_langbind.VideoEncoder computes what the package's model computes, to the bit."""
    ref, ours = package_pair(variant)
    with torch.no_grad():
        expected = F.normalize(ref.get_image_features(pixel_values=segments), dim=-1)
        assert torch.equal(ours(segments), expected)
        assert not torch.equal(ours(segments.flip(2)), expected)  # the frames' order matters (temporal attention)


def test_random_encoder_is_fixed_and_runs_in_the_package(segments):
    ours = load_encoder(random_init='tiny')
    assert torch.equal(load_encoder(random_init='tiny').state_dict()['visual_projection.weight'],
                       ours.state_dict()['visual_projection.weight'])
    ref = package_model(ours.config)
    ref.load_state_dict(ours.state_dict(), strict=False)
    with torch.no_grad():
        assert torch.equal(ours(segments), F.normalize(ref.get_image_features(pixel_values=segments), dim=-1))


@pytest.mark.parametrize('variant,how', [('vl', dict()), ('vl', dict(safe_serialization=False)),
                                         ('vl', dict(max_shard_size='100KB')),
                                         ('vl_new+lora+gelu_new', dict(safe_serialization=False, max_shard_size='100KB'))])
def test_checkpoint_folder_loads(variant, how, segments, tmp_path):
    """save_pretrained's folders (safetensors or .bin, sharded or not, LoRA names) load by name."""
    ref, ours = package_pair(variant)
    ref.save_pretrained(tmp_path, **how)
    if how.get('max_shard_size'):
        assert any(n.endswith('.index.json') for n in os.listdir(tmp_path))
    with torch.no_grad():
        assert torch.equal(load_encoder(str(tmp_path))(segments), ours(segments))


def test_checkpoint_errors(segments, tmp_path, capsys):
    ref, _ = package_pair('vl')
    ref.save_pretrained(tmp_path / 'ok')
    config = json.loads((tmp_path / 'ok' / 'config.json').read_text())

    def variant(name, edit_config=None, weights=None):
        folder = tmp_path / name
        shutil.copytree(tmp_path / 'ok', folder)
        if edit_config:
            c = json.loads(json.dumps(config))
            edit_config(c['vision_config'])
            (folder / 'config.json').write_text(json.dumps(c))
        if weights is not None:
            (folder / 'model.safetensors').unlink()
            torch.save(weights, folder / 'pytorch_model.bin')
        return str(folder)

    sd = ref.state_dict()
    cases = {
        variant('frames', lambda v: v.update(num_frames=4)): 'num_frames 4 (step 3 gives 8 RGB frames',
        variant('no_time', lambda v: v.update(add_time_attn=False)): 'add_time_attn is false',
        variant('act', lambda v: v.update(hidden_act='mish')): "hidden_act 'mish'",
        variant('eps_type', lambda v: v.update(layer_norm_eps='1e-5')): "layer_norm_eps '1e-5' (a number is needed)",
        variant('size_type', lambda v: v.update(hidden_size=32.0)): 'hidden_size 32.0 (an integer >= 1 is needed)',
        variant('heads_zero', lambda v: v.update(num_attention_heads=0)): 'num_attention_heads 0 (an integer >= 1',
        variant('act_type', lambda v: v.update(hidden_act=['gelu'])): "hidden_act ['gelu'] (a string is needed)",
        variant('channels', lambda v: v.update(num_channels=1)): 'num_channels 1 (step 3 gives',
        variant('image', lambda v: v.update(image_size=112)): 'image_size 112 (step 3 gives',
        variant('clip_type', lambda v: v.update(clip_type='vl3')): "clip_type 'vl3' (known: vl, vl_new)",
        variant('int_weights', weights={k: v.long() for k, v in sd.items()}): 'holds torch.int64 values',
        variant('not_tensors', weights={k: 3 for k in sd}): 'is a int, not a tensor',
        variant('width', lambda v: v.update(hidden_size=48)): 'has shape',
        variant('missing', weights={k: v for k, v in sd.items() if 'layers.1.mlp' not in k}):
            'weight(s) of the video encoder missing, e.g. vision_model.encoder.layers.1.mlp',
        # two names for one weight (peft's wrapping and the plain name): which one is meant is unknown
        variant('two_names', weights={**sd, 'vision_model.encoder.layers.0.temporal_attn.q_proj.base_layer.weight':
                                      sd['vision_model.encoder.layers.0.temporal_attn.q_proj.weight']}):
            'are both the weight vision_model.encoder.layers.0.temporal_attn.q_proj.weight',
        # trained LoRA weights that config.json (lora_r 0) would silently drop
        variant('lora_off', weights={**sd, 'vision_model.encoder.layers.0.temporal_attn.q_proj.lora_A.weight':
                                     torch.zeros(2, 32)}): 'holds LoRA weights',
        # and the other way round: LoRA switched on, its weights absent (merged before saving?)
        variant('lora_absent', lambda v: v.update(lora_r=2)): 'has lora_r 2 but the checkpoint holds no LoRA weights',
    }
    for folder, message in cases.items():
        with pytest.raises(InputError, match=re.escape(message)):
            load_encoder(folder)
    (tmp_path / 'bad_json').mkdir()
    (tmp_path / 'bad_json' / 'config.json').write_text('{not json')
    with pytest.raises(InputError, match='bad_json/config.json: not a LanguageBind config'):
        load_encoder(str(tmp_path / 'bad_json'))
    with pytest.raises(InputError, match="(?s)huggingface-cli download .*--model_path"):
        load_encoder(str(tmp_path / 'no_such_checkpoint'))
    (tmp_path / 'no_config').mkdir()  # a folder, but not a checkpoint
    with pytest.raises(InputError, match='no_config/config.json: cannot read'):
        load_encoder(str(tmp_path / 'no_config'))
    no_weights = variant('no_weights', weights={})
    os.remove(os.path.join(no_weights, 'pytorch_model.bin'))
    with pytest.raises(InputError, match='no_weights: no weights'):
        load_encoder(no_weights)
    # one weight in two shards: which one is meant is unknown
    shards = variant('shards', weights={})
    key = 'visual_projection.weight'
    torch.save({k: v for k, v in sd.items()}, os.path.join(shards, 'pytorch_model-1.bin'))
    torch.save({key: sd[key]}, os.path.join(shards, 'pytorch_model-2.bin'))
    os.remove(os.path.join(shards, 'pytorch_model.bin'))
    with open(os.path.join(shards, 'pytorch_model.bin.index.json'), 'w') as f:
        json.dump({'weight_map': {**{k: 'pytorch_model-1.bin' for k in sd}, key: 'pytorch_model-2.bin'}}, f)
    with pytest.raises(InputError, match=re.escape(f'{key} and {key} (in pytorch_model-1.bin) are both the weight')):
        load_encoder(shards)
    empty_index = variant('empty_index', weights={})
    os.remove(os.path.join(empty_index, 'pytorch_model.bin'))
    with open(os.path.join(empty_index, 'model.safetensors.index.json'), 'w') as f:
        json.dump({'weight_map': {}}, f)
    with pytest.raises(InputError, match='model.safetensors.index.json: not a weights index'):
        load_encoder(empty_index)
    # fp16 weights and a .bin in torch's pre-1.6 format (not a zip file) load, as in the package
    for name, save in (('fp16', dict()), ('legacy', dict(_use_new_zipfile_serialization=False))):
        folder = variant(name, weights={})
        torch.save({k: v.half() if name == 'fp16' else v for k, v in sd.items()}, os.path.join(folder, 'pytorch_model.bin'), **save)
        with torch.no_grad():
            torch.testing.assert_close(load_encoder(folder)(segments), load_encoder(str(tmp_path / 'ok'))(segments),
                                       atol=0 if name == 'legacy' else 1e-2, rtol=0)
    # weights the encoder does not use are named, as the package ignores them
    extra = variant('extra', weights={**sd, 'vision_model.encoder.layers.0.temporal_mlp.fc1.weight': torch.zeros(2)})
    load_encoder(extra)
    assert 'vision weight(s) not used by the video encoder, e.g. vision_model.encoder.layers.0.temporal_mlp' \
        in capsys.readouterr().out


class Payload:
    def __reduce__(self):
        return os.system, ('touch ran_code',)


def test_pickled_weights_run_no_code(tmp_path, monkeypatch):
    """A .bin whose pickle would run a command: refused (one line naming the file), nothing runs."""
    monkeypatch.chdir(tmp_path)
    ref, _ = package_pair('vl')
    ref.save_pretrained(tmp_path / 'ckpt', safe_serialization=False)
    torch.save({**ref.state_dict(), 'evil': Payload()}, tmp_path / 'ckpt' / 'pytorch_model.bin')
    with pytest.raises(InputError, match='pytorch_model.bin: cannot read the weights'):
        load_encoder(str(tmp_path / 'ckpt'))
    assert not (tmp_path / 'ran_code').exists()


@pytest.mark.slow
def test_end_to_end_resume_and_bad_videos(library, tmp_path, capsys):
    emb1, emb2, emb3 = tmp_path / 'e1', tmp_path / 'e2', tmp_path / 'e3'
    end = tmp_path / 'done.json'
    summary = run(write_jobs(library, emb1, tmp_path / 'j1.json'), '--num_workers', '2', '--end_job_file', str(end))
    out = capsys.readouterr().out
    assert summary['written'] == 3 and summary['failed'] == 2 and summary['segments'] == 6
    assert 0 < summary['first_batch_s'] <= summary['total_s'] and step3.STARTED is None  # timed from the 1st call
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

    # a second run, other batching (no workers): bitwise identical files; timed from its own start
    called = time.time()
    again = run(write_jobs(library, emb2, tmp_path / 'j2.json'), '--num_workers', '0')
    assert again['first_batch_s'] <= again['total_s'] <= time.time() - called + 0.005  # rounded to 0.01 s
    for vid in ['a', 'b', 'c']:
        assert (emb2 / f'{vid}.safetensors').read_bytes() == (emb1 / f'{vid}.safetensors').read_bytes()

    # the frames transformed on the model's device instead of in the workers: the same files
    run(write_jobs(library, tmp_path / 'e4', tmp_path / 'j4.json'), '--num_workers', '2', '--transform_on', 'device')
    for vid in ['a', 'b', 'c']:
        assert (tmp_path / 'e4' / f'{vid}.safetensors').read_bytes() == (emb1 / f'{vid}.safetensors').read_bytes()

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


# ---------------------------------------------------------------- hardening (one test per case)
def one_job_file(path, emb_dir, videos):
    """A job file for ``videos``: ``[(video id, video path, [(start, end)])]``."""
    jobs = [dict(video_id=vid, video_path=str(p), output_path=str(emb_dir / f'{vid}.safetensors'), fps=10.0,
                 num_frames=0, duration=wins[-1][1],
                 segments=[dict(index=k, start=s, end=e, path=None) for k, (s, e) in enumerate(wins)])
            for vid, p, wins in videos]
    path.write_text(json.dumps(dict(version=1, segment_sec=5.0, embedding_dir=str(emb_dir), jobs=jobs)))
    return path


def test_video_replaced_by_another_file_is_redone(library, tmp_path, capsys):
    """Steps 2 and 3 used to take a video replaced by another file of the same length (segments and
    times unchanged) as done: step 3 now records the video file's size in the store, and a store of a
    video whose file has another size is redone."""
    import prepare_paired_paths as step2
    import segment_video_library_movie_clip as step1
    videos, seg, emb = tmp_path / 'videos', tmp_path / 'seg', tmp_path / 'emb'
    videos.mkdir()
    for name in ('a.mp4', 'c.mp4'):
        shutil.copy(library / name, videos / name)
    step1.main(step1.get_args_parser().parse_args(['--video_dir', str(videos), '--output_dir', str(seg),
                                                   '--num_workers', '0']))
    step2_args = step2.get_args_parser().parse_args(['--segments_csv', str(seg / 'segments_metadata.csv'),
                                                     '--embedding_dir', str(emb)])
    step2.main(step2_args)
    assert run(seg / 'paired_paths.json', '--num_workers', '0')['written'] == 2
    assert read_metadata(str(emb / 'a.safetensors'))['video_bytes'] == str(os.path.getsize(videos / 'a.mp4'))
    old = (emb / 'a.safetensors').read_bytes()
    write_video(videos / 'a.mp4', color_frames(12.3, fps=10, size=(64, 48), seed=7), fps=10)  # same length
    assert os.path.getsize(videos / 'a.mp4') != os.path.getsize(library / 'a.mp4')
    capsys.readouterr()
    step2.main(step2_args)
    assert [j['video_id'] for j in json.loads((seg / 'paired_paths.json').read_text())['jobs']] == ['a']
    assert '(1 of them embedded before from a video file of another size: redone)' in capsys.readouterr().out
    summary = run(seg / 'paired_paths.json', '--num_workers', '0')
    assert summary['written'] == 1 and (emb / 'a.safetensors').read_bytes() != old
    fresh = one_job_file(tmp_path / 'fresh.json', tmp_path / 'fresh', [('a', videos / 'a.mp4', windows(12.3))])
    run(fresh, '--num_workers', '0')
    assert torch.equal(load_video_embeddings(str(emb / 'a.safetensors')),  # the new video's embeddings
                       load_video_embeddings(str(tmp_path / 'fresh' / 'a.safetensors')))
    step2.main(step2_args)  # and now it is complete
    assert json.loads((seg / 'paired_paths.json').read_text())['jobs'] == []
    # embedded from --reencode segment files: they, not the video, would have to be redone
    reencoded = dict(video_id='a', video_path=str(videos / 'a.mp4'), output_path=str(tmp_path / 'r.safetensors'),
                     segments=[dict(start=0.0, end=5.0, path=str(tmp_path / 'a' / '0-5' / 'video.mp4'))])
    step3.write_store(reencoded, torch.ones(1, 4), 'random_init:tiny', 'tiny', 5.0)
    assert 'video_bytes' not in read_metadata(str(tmp_path / 'r.safetensors'))


def test_store_of_another_encoder_is_refused_or_overwritten(library, tmp_path):
    emb = tmp_path / 'emb'
    jobs = one_job_file(tmp_path / 'jobs.json', emb, [('a', library / 'a.mp4', windows(12.3))])
    other = {'model': 'checkpoints/LanguageBind_Video_FT', 'random_init': '0'}
    save_video_embeddings(str(emb / 'a.safetensors'), torch.ones(3, 64), *zip(*windows(12.3)), other)
    with pytest.raises(InputError, match=r'another encoder: .*a.safetensors holds checkpoints/LanguageBind_Video_FT, '
                                         r'this run uses random_init:tiny .*--overwrite'):
        run(jobs, '--num_workers', '0')
    assert read_metadata(str(emb / 'a.safetensors'))['model'] == other['model']  # left as it was
    summary = run(jobs, '--num_workers', '0', '--overwrite')
    assert summary['written'] == 1 and read_metadata(str(emb / 'a.safetensors'))['model'] == 'random_init:tiny'
    assert run(jobs, '--num_workers', '0')['already_complete'] == 1  # same encoder: complete, kept


def test_complete_files_of_another_encoder_left_out_by_step2_are_refused(library, tmp_path, capsys):
    """Step 2 leaves complete files out of the job file, so step 3 never saw them and added its own
    encoder's files to another encoder's store; the job file now names their encoders, and step 3 stops
    (also with --overwrite, which cannot re-embed videos that are not jobs). Files without `model`
    metadata (converted legacy files) are not compared, as in step 4."""
    import prepare_paired_paths as step2
    emb = tmp_path / 'emb'
    csv = tmp_path / 'segments_metadata.csv'
    pd.DataFrame([dict(video_id=v, video_path=str(library / VIDEOS[v][3]), segment_index=k, start=s, end=e,
                       num_frames=0, fps=10.0, duration=VIDEOS[v][0], segment_path='')
                  for v in ('a', 'c') for k, (s, e) in enumerate(windows(VIDEOS[v][0]))]).to_csv(csv, index=False)
    other = {'model': 'checkpoints/LanguageBind_Video_FT', 'random_init': '0'}
    for meta in ({}, other):
        save_video_embeddings(str(emb / 'a.safetensors'), torch.ones(3, 64), *zip(*windows(12.3)), meta)
        step2.main(step2.get_args_parser().parse_args(['--segments_csv', str(csv), '--embedding_dir', str(emb)]))
        assert [j['video_id'] for j in json.loads((tmp_path / 'paired_paths.json').read_text())['jobs']] == ['c']
        if meta:
            assert '1 complete file(s) by checkpoints/LanguageBind_Video_FT' in capsys.readouterr().out
            for extra in ([], ['--overwrite']):
                with pytest.raises(InputError, match=r'1 complete store file\(s\) that step 2 left out .*'
                                                     r'a.safetensors holds checkpoints/LanguageBind_Video_FT, '
                                                     r'this run uses random_init:tiny \(random weights\)'):
                    run(tmp_path / 'paired_paths.json', '--num_workers', '0', *extra)
            assert not (emb / 'c.safetensors').exists()
        else:
            assert run(tmp_path / 'paired_paths.json', '--num_workers', '0')['written'] == 1
            os.remove(emb / 'c.safetensors')


@pytest.mark.slow
def test_long_names_and_unwritable_outputs_do_not_stop_the_others(library, tmp_path):
    """A legal 240-character file name goes through steps 1 to 3; a video whose store file cannot be
    written is listed as failed and the videos after it are still embedded."""
    import prepare_paired_paths as step2
    import segment_video_library_movie_clip as step1
    videos = tmp_path / 'videos'
    videos.mkdir()
    long_name = 'x' * 236 + '.mp4'
    shutil.copy(library / 'a.mp4', videos / long_name)
    for name in ('b0.mp4', 'c1.mp4'):
        shutil.copy(library / 'c.mp4', videos / name)
    step1.main(step1.get_args_parser().parse_args(['--video_dir', str(videos), '--output_dir', str(tmp_path / 'seg'),
                                                   '--num_workers', '0']))
    emb = tmp_path / 'emb'
    step2.main(step2.get_args_parser().parse_args(['--segments_csv', str(tmp_path / 'seg' / 'segments_metadata.csv'),
                                                   '--embedding_dir', str(emb)]))
    (emb / 'b0.safetensors').mkdir(parents=True)  # the store file's name is taken by a folder
    summary = run(tmp_path / 'seg' / 'paired_paths.json', '--num_workers', '0')
    assert summary['written'] == 2 and summary['failed'] == 1
    assert (emb / ('x' * 236 + '.safetensors')).is_file() and (emb / 'c1.safetensors').is_file()
    failures = pd.read_csv(emb / 'failed_paired_paths.csv')
    assert failures['video_id'].tolist() == ['b0'] and 'cannot write' in failures['reason'][0]
    assert not [n for n in os.listdir(emb) if n.endswith('.tmp')]


def test_strict_exit_status(library, tmp_path):
    jobs = one_job_file(tmp_path / 'jobs.json', tmp_path / 'emb', [('c', library / 'c.mp4', windows(3.0)),
                                                                   ('g', library / 'garbage.mp4', [(0.0, 5.0)])])
    end = tmp_path / 'end.json'
    with pytest.raises(SystemExit) as e:
        run(jobs, '--num_workers', '0', '--strict', '--end_job_file', str(end))
    assert e.value.code == 1
    assert json.loads(end.read_text())['failed'] == 1 and (tmp_path / 'emb' / 'c.safetensors').is_file()


@pytest.mark.parametrize('segments, message', [
    ([], 'no segments'),                                         # used to be neither written nor reported
    ([dict(index=0, end=3.0)], 'segment 0 is not a window'),     # used to fail as "KeyError: 'start'"
    ([dict(index=0, start=0.0, end=3.0), dict(index=1, start=3.0, end=float('nan'))], 'segment 1 is not a window'),
    ([dict(index=0, start='0', end=3.0)], 'segment 0 is not a window')])
def test_job_file_edited_by_hand_is_checked(library, tmp_path, segments, message):
    jobs = one_job_file(tmp_path / 'jobs.json', tmp_path / 'emb', [('c', library / 'c.mp4', windows(3.0))] * 2)
    spec = json.loads(jobs.read_text())
    spec['jobs'][1]['segments'] = segments
    jobs.write_text(json.dumps(spec))
    with pytest.raises(InputError, match=re.escape(f'jobs.json job 2 (video c): {message}')):
        run(jobs, '--num_workers', '0')
    assert not (tmp_path / 'emb').exists()


def test_decoding_process_that_dies_fails_its_video_only(library, tmp_path, monkeypatch):
    """A decoding worker killed by its video (FFmpeg crashing: SIGSEGV) or by something passing (the
    out-of-memory killer: SIGKILL, once): the videos it may have been on are decoded again, one at a
    time; the one that kills its process again fails, the others are written as in a run without deaths."""
    import faulthandler
    import signal
    from torch.utils.data import get_worker_info
    videos = [(v, library / VIDEOS[v][3], windows(VIDEOS[v][0])) for v in ('a', 'b', 'c')]
    reference = tmp_path / 'ref'
    run(one_job_file(tmp_path / 'ref.json', reference, videos), '--num_workers', '2')
    real, once = step3.job_segments, tmp_path / 'killed_once'

    def dying(job, *args, **kwargs):
        for k, (i, x) in enumerate(real(job, *args, **kwargs)):
            if get_worker_info() is not None and k == 1:  # the video's 2nd segment, the 1st one sent
                if job['video_id'] == 'b':
                    faulthandler.disable()  # pytest's: no traceback dump from the worker
                    os.kill(os.getpid(), signal.SIGSEGV)
                if job['video_id'] == 'a' and not once.exists():
                    once.touch()
                    os.kill(os.getpid(), signal.SIGKILL)
            yield i, x

    monkeypatch.setattr(step3, 'job_segments', dying)
    monkeypatch.setattr(step3, 'CHUNK', 1)  # a's and b's first segments reach the main process first
    emb = tmp_path / 'emb'
    summary = run(one_job_file(tmp_path / 'jobs.json', emb, videos), '--num_workers', '2')
    assert once.exists() and summary['written'] == 2 and summary['failed'] == 1
    failures = pd.read_csv(emb / 'failed_jobs.csv')
    assert failures['video_id'].tolist() == ['b']
    # no process id in the file: a rerun on the same crashing video writes the same bytes
    assert failures['reason'][0] == 'its decoding process died (DataLoader worker exited unexpectedly)'
    for vid in ('a', 'c'):
        assert (emb / f'{vid}.safetensors').read_bytes() == (reference / f'{vid}.safetensors').read_bytes()
    assert not (emb / 'b.safetensors').exists()
    assert callable(signal.getsignal(signal.SIGCHLD))  # DataLoader's handler, off during the run, is back


def test_decoding_process_that_dies_while_its_item_is_received(library, tmp_path, monkeypatch):
    """The main process receives an item's tensors from the worker that sent it (their file
    descriptors, over a socket): a worker that dies meanwhile gives EOFError or ConnectionResetError,
    before it is seen dead. That is a death like the others: its video fails, the others are written
    (the error stopped the run)."""
    import multiprocessing.reduction
    import signal
    from torch.utils.data import get_worker_info
    videos = [(v, library / VIDEOS[v][3], windows(VIDEOS[v][0])) for v in ('a', 'b', 'c')]
    real_segments, real_send, dying = step3.job_segments, multiprocessing.reduction.send_handle, []

    def segments(job, *args, **kwargs):
        for i, x in real_segments(job, *args, **kwargs):
            if get_worker_info() is not None and job['video_id'] == 'b':
                dying.append(True)  # in this worker: it dies as it hands out b's tensors
            yield i, x

    def send_handle(conn, handle, pid):  # in the worker's thread that hands out its tensors
        if dying:
            conn.close()  # the main process gets EOFError, then the worker dies
            time.sleep(0.5)
            os.kill(os.getpid(), signal.SIGKILL)
        real_send(conn, handle, pid)

    monkeypatch.setattr(step3, 'job_segments', segments)
    monkeypatch.setattr(multiprocessing.reduction, 'send_handle', send_handle)
    emb = tmp_path / 'emb'
    summary = run(one_job_file(tmp_path / 'jobs.json', emb, videos), '--num_workers', '2')
    assert (summary['written'], summary['failed']) == (2, 1)
    failures = pd.read_csv(emb / 'failed_jobs.csv')
    assert failures['video_id'].tolist() == ['b'] and failures['reason'][0].startswith('its decoding process died (')
    assert sorted(os.listdir(emb)) == ['a.safetensors', 'c.safetensors', 'failed_jobs.csv']


def test_video_written_before_its_decoding_process_died_is_not_failed(library, tmp_path, monkeypatch):
    """A video decoded again alone after a death, whose process dies once every segment has been
    handed out (FFmpeg crashing as it closes the file): its file is written, and it is not listed as
    failed too (it was counted both written and failed)."""
    import multiprocessing.reduction
    import signal
    from torch.utils.data import get_worker_info
    videos = [(v, library / VIDEOS[v][3], windows(VIDEOS[v][0])) for v in ('a', 'b', 'c')]
    real_segments, real_send, dying, sent = step3.job_segments, multiprocessing.reduction.send_handle, [], []

    def segments(job, *args, **kwargs):
        info = get_worker_info()
        alone = info is not None and info.num_workers == 1
        for i, x in real_segments(job, *args, **kwargs):
            if info is not None and job['video_id'] == 'b' and not alone:
                dying.append(True)  # among 2 workers: it dies as it hands out b's first segment
            yield i, x
        if alone and job['video_id'] == 'b':  # alone: it dies once the main process has b's segments
            deadline = time.time() + 30
            while len(sent) < len(job['segments']) and time.time() < deadline:
                time.sleep(0.01)
            os.kill(os.getpid(), signal.SIGKILL)

    def send_handle(conn, handle, pid):  # as in test_decoding_process_that_dies_while_its_item_is_received
        if dying:
            conn.close()
            time.sleep(0.5)
            os.kill(os.getpid(), signal.SIGKILL)
        real_send(conn, handle, pid)
        sent.append(True)  # (one segment a chunk)

    monkeypatch.setattr(step3, 'job_segments', segments)
    monkeypatch.setattr(multiprocessing.reduction, 'send_handle', send_handle)
    monkeypatch.setattr(step3, 'CHUNK', 1)
    emb = tmp_path / 'emb'
    summary = run(one_job_file(tmp_path / 'jobs.json', emb, videos), '--num_workers', '2', '--batch_size', '2')
    assert (summary['written'], summary['failed']) == (3, 0)
    assert pd.read_csv(emb / 'failed_jobs.csv').empty
    assert sorted(os.listdir(emb)) == ['a.safetensors', 'b.safetensors', 'c.safetensors', 'failed_jobs.csv']


def write_vfr(path, segments, fps=10, size=(64, 48)):
    """A variable-frame-rate mp4: frames at ``fps`` during each ``(start, end)`` of ``segments`` only."""
    from fractions import Fraction
    import av
    rng = np.random.default_rng(0)
    with av.open(str(path), 'w') as c:
        s = c.add_stream('libx264', rate=fps)
        s.width, s.height, s.pix_fmt = size[0], size[1], 'yuv420p'
        s.codec_context.time_base = Fraction(1, 1000)
        for start, end in segments:
            for t in np.arange(start, end, 1 / fps):
                f = av.VideoFrame.from_ndarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), 'rgb24')
                f.pts, f.time_base = int(round(t * 1000)), Fraction(1, 1000)
                for p in s.encode(f):
                    c.mux(p)
        for p in s.encode():
            c.mux(p)


def test_pause_in_variable_frame_rate_video(tmp_path):
    """A 5-s window without any frame takes the last frame before it (8 times)."""
    path = tmp_path / 'vfr.mp4'
    write_vfr(path, [(0, 2), (11, 14)])
    segs = list(decode_segments(str(path), [(0.0, 5.0), (5.0, 10.0), (10.0, 14.0)]))
    assert [k for k, _ in segs] == [0, 1, 2]
    for slot in range(8):
        assert torch.equal(segs[1][1][:, slot], segs[0][1][:, 7])  # the frame at 1.9 s
    assert not torch.equal(segs[2][1][:, 0], segs[0][1][:, 7])


@pytest.mark.slow
def test_model_threads_do_not_follow_num_workers(library, tmp_path, monkeypatch):
    """The model's CPU thread count (which changes its numerics) is the same with 0 and 2 workers."""
    seen = []
    real = step3.embed

    def spy(*args):
        seen.append(torch.get_num_threads())
        return real(*args)
    monkeypatch.setattr(step3, 'embed', spy)
    before = torch.get_num_threads()
    try:
        for k, workers in enumerate(['0', '2']):
            torch.set_num_threads(3 - k)  # whatever the process had before must not matter either
            run(write_jobs(library, tmp_path / f'e{workers}', tmp_path / f'j{workers}.json'), '--num_workers', workers)
    finally:
        torch.set_num_threads(before)
    assert len(set(seen)) == 1 and seen[0] == step3.model_threads() == max(1, step3.num_cpus() // 2)
    for vid in ['a', 'b', 'c']:
        assert (tmp_path / 'e0' / f'{vid}.safetensors').read_bytes() == (tmp_path / 'e2' / f'{vid}.safetensors').read_bytes()


def test_only_own_temporary_files_are_removed(library, tmp_path):
    """A temporary file another step-3 process is still writing (it holds its lock) is left alone,
    however old; an unlocked one with data (a killed run's) is removed, also right after the kill and
    also once its video is complete; a young empty one (its writer may not hold the lock yet) is kept."""
    import fcntl
    emb = tmp_path / 'emb'
    emb.mkdir()
    busy, stale, young = emb / '.a.safetensors.b5sy0000.tmp', emb / '.a.safetensors.st4le000.tmp', emb / '.a.safetensors.y0ung000.tmp'
    killed = emb / '.a.safetensors.k1ll3d00.tmp'  # killed a moment ago
    for p in (busy, stale, killed):
        p.write_bytes(b'partial')
    young.write_bytes(b'')
    for p in (busy, stale):
        os.utime(p, (1e9, 1e9))
    jobs = one_job_file(tmp_path / 'jobs.json', emb, [('a', library / 'a.mp4', windows(12.3))])
    fd = os.open(busy, os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)  # as atomic_write holds it while writing
    try:
        run(jobs, '--num_workers', '0')
        assert busy.exists() and young.exists() and not stale.exists() and not killed.exists()
    finally:
        os.close(fd)
    assert (emb / 'a.safetensors').is_file()
    killed.write_bytes(b'partial')  # a second run on the same job file killed while rewriting it
    listing, end = emb / '.failed_jobs.csv.k1ll3d00.tmp', tmp_path / '.end.json.k1ll3d00.tmp'
    listing.write_bytes(b'video_id')
    end.write_bytes(b'{')
    assert run(jobs, '--num_workers', '0', '--end_job_file', str(tmp_path / 'end.json'))['already_complete'] == 1
    assert not killed.exists() and not busy.exists()  # used to be kept: only the videos to do were swept
    assert not listing.exists() and not end.exists()


def test_raw_frames_transformed_later_equal_the_transformed_ones(library, monkeypatch):
    """decode_segments(raw=True) (the transform left to the model's device): the same frames, and
    frames above RAW_MAX_PIXELS, or of several sizes in one segment, are transformed in the worker."""
    path, wins = str(library / 'a.mp4'), windows(12.3)
    ref = list(decode_segments(path, wins))
    raw = list(decode_segments(path, wins, raw=True))
    assert [k for k, _ in raw] == [k for k, _ in ref] and all(x.dtype == torch.uint8 and x.shape == (8, 48, 64, 3)
                                                               for _, x in raw)
    assert all(torch.equal(transform(x), y) for (_, x), (_, y) in zip(raw, ref))
    monkeypatch.setattr(frames, 'RAW_MAX_PIXELS', 48 * 64 - 1)
    assert all(torch.equal(x, y) for (_, x), (_, y) in zip(decode_segments(path, wins, raw=True), ref))
    small, tall = np.zeros((48, 64, 3), np.uint8), np.full((64, 48, 3), 200, np.uint8)
    mixed = frames._assemble([small, tall, small], shared=False)
    assert mixed.shape == (3, 3, 224, 224) and torch.equal(mixed[:, 1], transform(tall[None])[:, 0])


def test_transform_does_not_depend_on_threads(library, monkeypatch):
    """PyTorch's CPU bilinear resize of 3 channels takes another kernel (other float rounding) with
    1 thread than with several: the DataLoader workers run 1 thread, the main process --threads. The
    transform uses the 1-thread kernel whatever the thread count, so --transform_on device (or
    --num_workers 0) with --threads 2 gives the workers' model input to the bit."""
    raw = [x for _, x in decode_segments(str(library / 'a.mp4'), windows(12.3), raw=True)]
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = [transform(x) for x in raw]
        torch.set_num_threads(2)
        two = [transform(x) for x in raw]
        assert torch.get_num_threads() == 2  # restored
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(x, y) for x, y in zip(one, two))
    # and a frame of extreme aspect ratio (a huge resize before the crop) is transformed in the worker
    monkeypatch.setattr(frames, 'RAW_MAX_PIXELS', 70000)  # 64x48 resizes to 298x224: 66752 pixels
    assert all(x.dtype == torch.uint8 for _, x in decode_segments(str(library / 'a.mp4'), windows(12.3), raw=True))
    monkeypatch.setattr(frames, 'RAW_MAX_PIXELS', 60000)
    assert all(x.shape == (3, 8, 224, 224) for _, x in decode_segments(str(library / 'a.mp4'), windows(12.3), raw=True))


def test_worker_items_are_bounded_in_bytes(library, tmp_path, monkeypatch):
    """A worker's item holds at most CHUNK segments, and no more once it holds CHUNK_BYTES (raw
    frames of large videos); the segments are the same either way."""
    jobs = json.loads(write_jobs(library, tmp_path / 'e', tmp_path / 'j.json').read_text())['jobs'][:2]
    items = list(step3.SegmentFrames(jobs, 2, raw=True))
    assert [len(it['index']) for it in items] == [2, 1, 2]  # a: 3 segments, b: 2
    monkeypatch.setattr(step3, 'CHUNK_BYTES', 8 * 48 * 64 * 3)  # one raw segment of either video
    small = list(step3.SegmentFrames(jobs, 2, raw=True))
    assert [len(it['index']) for it in small] == [1, 1, 1, 1, 1]
    def flat(its):
        return [(it['job'], i, x) for it in its for i, x in zip(it['index'], it['pixels'])]
    assert [(j, i) for j, i, _ in flat(small)] == [(j, i) for j, i, _ in flat(items)]
    assert all(torch.equal(x, y) for (_, _, x), (_, _, y) in zip(flat(small), flat(items)))


def test_rotated_video_is_turned_upright(tmp_path):
    import av
    plain, turned = tmp_path / 'plain.mp4', tmp_path / 'turned.mp4'
    write_video(plain, color_frames(1.0, fps=10, size=(96, 64), seed=1), fps=10)  # 10 frames, landscape
    rotate_in_header(plain, turned)
    with av.open(str(turned)) as c:
        frames = [f for f in c.decode(video=0)]
    assert frames[0].rotation == -90  # FFmpeg reads the matrix: shown turned 90 degrees clockwise
    raw = np.stack([f.to_ndarray(format='rgb24') for f in frames])
    upright = np.ascontiguousarray(np.rot90(raw, k=-1, axes=(1, 2)))  # [10, 96, 64]: portrait
    (_, ours), = decode_segments(str(turned))
    torch.testing.assert_close(ours, transform(upright[frame_indices(10)]), atol=0, rtol=0)
    (_, unturned), = decode_segments(str(plain))
    assert not torch.allclose(ours, unturned)


def write_bframes(path, seconds, options, fps=30, codec='libx264', format=None, size=(160, 96)):
    """A textured video, 160x96 unless ``size`` says (``codec``'s B-frames and GOPs as ``options`` say);
    its frame count."""
    return write_video(path, moving_texture_frames(seconds, fps, size), fps=fps, codec=codec,
                       options=options, format=format)


@pytest.mark.parametrize('options', [
    {'threads': '1'},                                                         # libx264 defaults: 3 B-frames, pyramid
    {'threads': '1', 'x264-params': 'keyint=24:min-keyint=24:open-gop=1:bframes=3:scenecut=0'},  # open GOPs
])
@pytest.mark.parametrize('threads', [1, 2])
def test_skipping_unsampled_frames_keeps_the_frames(tmp_path, options, threads):
    """Letting the decoder drop the non-reference frames no segment samples gives exactly the frames
    of a full decode, and does skip frames."""
    path = str(tmp_path / 'v.mp4')
    n = write_bframes(path, 6.0, options)
    wins = [(0.0, 2.5), (2.5, 5.0), (5.0, 6.0)]
    fast, full = {}, {}
    ours = list(decode_segments(path, wins, threads=threads, stats=fast))
    ref = list(decode_segments(path, wins, threads=threads, skip=False, stats=full))
    assert full['decoded'] == n and fast['decoded'] < 0.8 * n  # about half the frames are non-reference B-frames
    assert [k for k, _ in ours] == [k for k, _ in ref] == [0, 1, 2]
    for (_, x), (_, y) in zip(ours, ref):
        assert torch.equal(x, y)


@pytest.mark.parametrize('name, codec, options, parallel', [
    ('closed.mp4', 'libx264', {'threads': '1', 'x264-params': 'keyint=24:min-keyint=24:bframes=3:scenecut=0'}, True),
    ('closed.mkv', 'libx264', {'threads': '1', 'x264-params': 'keyint=24:min-keyint=24:bframes=3:scenecut=0'}, True),
    ('hevc.mp4', 'libx265', {'x265-params': 'keyint=24:min-keyint=24:bframes=3:scenecut=0:open-gop=0:log-level=0'}, True),
    # HEVC open GOPs (libx265's default): cut at CRA pictures, whose leading frames belong to the part before
    ('cra.mkv', 'libx265', {'x265-params': 'keyint=24:min-keyint=24:bframes=3:scenecut=0:open-gop=1:log-level=0'}, True),
    # VP9 and AV1 (no skipping): cut at their shown key frames
    ('vp9.webm', 'libvpx-vp9', {'g': '24', 'threads': '1', 'cpu-used': '8'}, True),
    ('av1.mp4', 'libsvtav1', {'g': '24', 'preset': '11', 'svtav1-params': 'log-level=1'}, True),
    ('open.mp4', 'libx264', {'threads': '1', 'x264-params': 'keyint=24:min-keyint=24:open-gop=1:bframes=3:scenecut=0'}, False),
    # AV1 with forward key frames (hidden, shown later: not a place to start): one piece
    ('fwdkf.mkv', 'libsvtav1', {'g': '24', 'preset': '11', 'svtav1-params': 'irefresh-type=1:log-level=1'}, False),
    ('closed.ts', 'libx264', {'threads': '1', 'x264-params': 'keyint=24:min-keyint=24:bframes=3:scenecut=0'}, False),
])
def test_parts_decoded_in_parallel_keep_the_frames(tmp_path, name, codec, options, parallel):
    """A video is cut at its IDR pictures (HEVC: also CRA; VP9 / AV1: key frames) into parts (in MP4
    or Matroska), decoded on as many threads as given: exactly the frames of one full decode, in order.
    H.264 open GOPs (no IDR after the first frame) and containers that cannot seek exactly are decoded
    in one piece."""
    path = str(tmp_path / name)
    write_bframes(path, 6.0, options, codec=codec)
    wins = [(0.0, 1.0), (1.0, 2.5), (2.5, 2.6), (2.6, 5.0), (5.0, 6.0)] + [(t / 4, t / 4 + 0.1) for t in range(24)]
    one, many, full = {}, {}, {}
    ref = list(decode_segments(path, wins, skip=False, stats=full))  # every frame, front to back
    for threads, stats, raw in ((1, one, False), (3, many, True)):
        ours = list(decode_segments(path, wins, threads=threads, stats=stats, raw=raw))
        assert (stats['parts'] > 1) == parallel and full['parts'] == 1
        assert [k for k, _ in ours] == [k for k, _ in ref] == list(range(len(wins)))
        for (_, x), (_, y) in zip(ours, ref):
            assert torch.equal(transform(x.numpy()) if x.dtype == torch.uint8 else x, y)


def test_long_video_in_at_most_max_parts(tmp_path, monkeypatch):
    """A long video is cut into about MAX_PARTS parts of whole GOPs (each part opens the file), the same
    frames; the plan: every part starts at an IDR picture and holds at least ``least`` keys but the last."""
    todo, idr = list(range(0, 1000)), list(range(0, 1000, 7))
    parts = frames._parts(todo, idr, 40)
    assert [k for _, ks in parts for k in ks] == todo and all(s in idr for s, _ in parts)
    assert all(len(ks) >= 40 for _, ks in parts[:-1]) and len(parts) <= 1000 // 40
    path = _closed_gops(tmp_path / 'v.mp4', 6.0, keyint=6)
    wins = [(t / 5, t / 5 + 0.2) for t in range(30)]  # 240 keys, a GOP every 0.2 s
    ref = list(decode_segments(path, wins, skip=False))
    many, few = {}, {}
    list(decode_segments(path, wins, threads=2, stats=many))
    monkeypatch.setattr(frames, 'MAX_PARTS', 4)
    ours = list(decode_segments(path, wins, threads=2, stats=few))
    assert few['parts'] <= 4 < many['parts']
    assert all(torch.equal(x, y) for (_, x), (_, y) in zip(ours, ref)) and len(ours) == len(ref)


def test_part_whose_seek_misses_its_idr_decodes_from_the_start(tmp_path, monkeypatch):
    """A part whose seek does not land on its IDR picture (as in a Matroska file without an index) is
    decoded from the file's start instead: the same frames."""
    path = _closed_gops(tmp_path / 'closed.mp4', 4.0, keyint=24)
    wins = [(0.0, 1.0), (1.0, 2.0), (2.0, 3.0), (3.0, 4.0)]
    ref = list(decode_segments(path, wins, skip=False))
    parts = frames._parts
    monkeypatch.setattr(frames, '_parts', lambda *a: [(None if s is None else s + 1, k) for s, k in parts(*a)])
    stats = {}
    ours = list(decode_segments(path, wins, threads=2, stats=stats))
    assert stats['parts'] > 1 and [k for k, _ in ours] == [k for k, _ in ref]
    assert all(torch.equal(x, y) for (_, x), (_, y) in zip(ours, ref))


def _closed_gops(path, seconds=6.0, keyint=12):
    write_bframes(path, seconds, {'threads': '1', 'x264-params':
                                  f'keyint={keyint}:min-keyint={keyint}:bframes=3:b-pyramid=normal:scenecut=0'})
    return str(path)


def _packets(path):
    import av
    with av.open(path) as c:
        return [(p.pts, p.pos, p.size, p.is_keyframe) for p in c.demux(c.streams.video[0]) if p.size]


def _outcome(path, wins, threads):
    """The segments decode_segments yields, and the DecodeError's message (None: no error)."""
    out = []
    try:
        for k, x in decode_segments(path, wins, threads=threads):
            out.append((k, x))
    except frames.DecodeError as e:
        return out, str(e)
    return out, None


def _same(a, b):
    return len(a) == len(b) and all(i == j and torch.equal(x, y) for (i, x), (j, y) in zip(a, b))


def test_parts_keep_the_frames_of_a_damaged_idr(tmp_path):
    """One byte flipped inside an IDR picture where a part starts (FFmpeg conceals it, no error): the
    same frames whatever the number of threads."""
    path = _closed_gops(tmp_path / 'v.mp4')
    wins = [(t / 2, t / 2 + 0.5) for t in range(12)]
    stats = {}
    list(decode_segments(path, wins, threads=2, stats=stats))
    assert stats['parts'] > 2
    pk = _packets(path)
    idr = [p for p in pk if p[3]][2]  # the third IDR (frame 24) starts a part
    data = bytearray(open(path, 'rb').read())
    data[idr[1] + idr[2] // 2] ^= 0xA5
    open(path, 'wb').write(bytes(data))
    one, many = _outcome(path, wins, 1), _outcome(path, wins, 2)
    assert one[1] is None and many[1] is None
    assert _same(one[0], many[0]) and _same(one[0], _outcome(path, wins, 3)[0])


def test_parts_fail_or_not_whatever_the_threads(tmp_path):
    """A damaged reference frame after the last sampled frame of its GOP: a full decode fails; the
    parts never decode it, and give the same frames with any number of threads."""
    path = _closed_gops(tmp_path / 'v.mp4', keyint=24)
    pk = _packets(path)
    pts = sorted(p[0] for p in pk)
    victim = next(p for p in pk if p[0] == pts[44])  # a P-frame late in the GOP of frames 24-47
    assert not victim[3]
    data = bytearray(open(path, 'rb').read())
    data[victim[1]:victim[1] + 4] = b'\x00\x00\xff\xff'  # its first NAL unit's length
    open(path, 'wb').write(bytes(data))
    wins = [(g * 0.8, g * 0.8 + 0.27) for g in range(7)]  # the first 8 frames of each GOP
    with pytest.raises(frames.DecodeError, match='segment 2'):
        list(decode_segments(path, wins, skip=False))
    one, many = _outcome(path, wins, 1), _outcome(path, wins, 2)
    assert one[1] is None and many[1] is None and len(one[0]) == 7 and _same(one[0], many[0])


def test_parts_yield_the_same_before_an_error(tmp_path):
    """A damaged frame that makes FFmpeg fail: the same segments before the same DecodeError, whatever
    the number of threads."""
    path = _closed_gops(tmp_path / 'v.mp4')
    pk = _packets(path)
    victim = pk[[i for i, p in enumerate(pk) if p[3]][7] + 3]  # a frame of the 8th GOP
    data = bytearray(open(path, 'rb').read())
    data[victim[1]:victim[1] + 4] = b'\x00\x00\xff\xff'
    open(path, 'wb').write(bytes(data))
    wins = [(t / 2, t / 2 + 0.5) for t in range(12)]
    one, many = _outcome(path, wins, 1), _outcome(path, wins, 2)
    assert one[1] is not None and many[1] is not None
    assert [k for k, _ in many[0]] == [k for k, _ in one[0]]
    assert many[1] == one[1]


def _strip_bitstream_restriction(sps):
    """An H.264 SPS NAL unit (x264's: VUI without HRD, no scaling lists) without the VUI's
    bitstream_restriction (max_num_reorder_frames): as many encoders write it."""
    def unescape(b):
        out, z = bytearray(), 0
        for x in b:
            if z >= 2 and x == 3:
                z = 0
                continue
            out.append(x)
            z = z + 1 if x == 0 else 0
        return bytes(out)

    def escape(b):
        out, z = bytearray(), 0
        for x in b:
            if z >= 2 and x <= 3:
                out.append(3)
                z = 0
            out.append(x)
            z = z + 1 if x == 0 else 0
        return bytes(out)

    rb, pos = unescape(sps[1:]), [0]

    def u(n):
        v = 0
        for _ in range(n):
            v = (v << 1) | ((rb[pos[0] >> 3] >> (7 - (pos[0] & 7))) & 1)
            pos[0] += 1
        return v

    def ue():
        z = 0
        while u(1) == 0:
            z += 1
        return (1 << z) - 1 + u(z)

    profile = u(8)
    u(16), ue()
    if profile in (100, 110, 122, 244, 44, 83, 86, 118, 128, 138, 139, 134, 135):
        if ue() == 3:
            u(1)
        ue(), ue(), u(1)
        assert u(1) == 0  # no scaling matrices
    ue()
    assert ue() == 0  # pic_order_cnt_type 0
    ue(), ue(), u(1), ue(), ue()
    if u(1) == 0:
        u(1)
    u(1)
    if u(1):
        ue(), ue(), ue(), ue()
    assert u(1) == 1  # VUI
    if u(1) and u(8) == 255:
        u(32)
    if u(1):
        u(1)
    if u(1):
        u(4)
        if u(1):
            u(24)
    if u(1):
        ue(), ue()
    if u(1):
        u(65)
    assert u(1) == 0 and u(1) == 0  # no HRD
    u(1)
    end = pos[0]
    assert u(1) == 1  # bitstream_restriction_flag
    bits = [(rb[i >> 3] >> (7 - (i & 7))) & 1 for i in range(end)] + [0, 1]
    bits += [0] * (-len(bits) % 8)
    return sps[:1] + escape(bytes(int(''.join(map(str, bits[i:i + 8])), 2) for i in range(0, len(bits), 8)))


def test_no_parts_without_reorder_info(tmp_path):
    """H.264 in Matroska whose SPS does not state its reorder depth, the first GOPs without B-frames
    (FFmpeg learns the depth while decoding, dropping a picture each time it grows: parts would drop
    others): decoded in one piece, the same frames whatever the number of threads."""
    import av
    src, path = str(tmp_path / 'src.mp4'), str(tmp_path / 'v.mkv')
    with av.open(src, 'w') as c:
        st = c.add_stream('libx264', rate=30, options={
            'threads': '1', 'x264-params': 'keyint=24:min-keyint=24:bframes=3:b-pyramid=normal:scenecut=0'})
        st.width, st.height, st.pix_fmt = 160, 96, 'yuv420p'
        for i, f in enumerate(moving_texture_frames(8.0, 30, (160, 96))):
            frame = av.VideoFrame.from_ndarray(f, format='rgb24')
            if i < 48 and i % 24:
                frame.pict_type = av.video.frame.PictureType.P
            for p in st.encode(frame):
                c.mux(p)
        for p in st.encode():
            c.mux(p)
    with av.open(src) as i, av.open(path, 'w') as o:
        s = i.streams.video[0]
        out = o.add_stream_from_template(s)
        x = s.codec_context.extradata
        n = int.from_bytes(x[6:8], 'big')
        sps = _strip_bitstream_restriction(x[8:8 + n])
        out.codec_context.extradata = x[:6] + len(sps).to_bytes(2, 'big') + sps + x[8 + n:]
        for p in i.demux(s):
            if p.dts is not None:
                p.stream = out
                o.mux(p)
    # parts at frames 0, 24 (no B-frames), 72, 96, 120, 144: which of the last ones differ depends on
    # which thread's decoder (its reorder depth learned in an earlier part, or not) takes them
    wins = [(t, t + 0.27) for t in (0.0, 0.8, 2.4, 3.2, 4.0, 4.8)]
    one, stats = list(decode_segments(path, wins, threads=1)), {}
    for _ in range(3):
        assert _same(one, list(decode_segments(path, wins, threads=2, stats=stats)))
        assert stats['parts'] == 1


@pytest.mark.slow
def test_torchrun_ranks_share_jobs_and_failures(library, tmp_path):
    """Two ranks: every video once, files identical to one process's, the failures of every rank in
    one failures file written by rank 0, and the end-job file counting them."""
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    videos = [('a', library / 'a.mp4', windows(12.3)), ('g', library / 'garbage.mp4', [(0.0, 5.0)]),
              ('c', library / 'c.mp4', windows(3.0))]
    run(one_job_file(tmp_path / 'one.json', tmp_path / 'one', videos), '--num_workers', '0')
    jobs, end = one_job_file(tmp_path / 'two.json', tmp_path / 'two', videos), tmp_path / 'end.json'
    r = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2',
                        'langbind_preprocessing.py', '--video_path_file', str(jobs), '--random_init', 'tiny',
                        '--batch_size', '4', '--num_workers', '0', '--device', 'cpu', '--end_job_file', str(end)],
                       cwd=root, capture_output=True, text=True, timeout=300,
                       env={**os.environ, 'PYTHONPATH': root + os.pathsep + os.environ.get('PYTHONPATH', '')})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    summary = json.loads(end.read_text())
    assert (summary['jobs'], summary['written'], summary['failed']) == (3, 2, 1)
    assert pd.read_csv(tmp_path / 'two' / 'failed_two.csv')['video_id'].tolist() == ['g']  # rank 1's failure
    for vid in ['a', 'c']:
        assert (tmp_path / 'two' / f'{vid}.safetensors').read_bytes() == (tmp_path / 'one' / f'{vid}.safetensors').read_bytes()


def _annexb(frames_list, params):
    """Packets (Annex B, SPS and PPS before each IDR picture) of libx264 encoding ``frames_list``."""
    import av
    from fractions import Fraction
    cc = av.CodecContext.create('libx264', 'w')
    cc.width, cc.height, cc.pix_fmt, cc.time_base, cc.framerate = 160, 96, 'yuv420p', Fraction(1, 30), 30
    cc.options = {'threads': '1', 'x264-params': params}
    out = []
    for i, f in enumerate(frames_list):
        frame = av.VideoFrame.from_ndarray(f, format='rgb24')
        frame.pts = i
        out += [bytes(p) for p in cc.encode(frame)]
    return out + [bytes(p) for p in cc.encode()]


def test_parts_keep_parameter_sets_sent_in_band(tmp_path):
    """Two encodes joined (as `-f concat -c copy` of two clips does): the second's PPS (another
    chroma_qp_index_offset) in-band before its first IDR picture only. A part decoded from an IDR
    would not know it: such a video is decoded in one piece, the frames of a full decode, whatever the
    threads."""
    import av
    from fractions import Fraction
    fr = list(moving_texture_frames(4.0, 30, (160, 96)))
    gops = 'keyint=12:min-keyint=12:bframes=0:scenecut=0'
    raw = []
    for seg in (_annexb(fr[:60], gops), _annexb(fr[60:], gops + ':chroma-qp-offset=10')):
        for i, p in enumerate(seg):
            nals = [n for n in re.split(b'\x00\x00\x00\x01|\x00\x00\x01', p) if n]
            raw += [b'\x00\x00\x00\x01' + n for n in nals if i == 0 or n[0] & 0x1f not in (7, 8)]
    (tmp_path / 'v.h264').write_bytes(b''.join(raw))
    path = str(tmp_path / 'v.mkv')
    with av.open(str(tmp_path / 'v.h264'), format='h264') as i, av.open(path, 'w') as o:
        s = i.streams.video[0]
        out = o.add_stream_from_template(s)
        out.time_base = Fraction(1, 30)
        for n, p in enumerate(q for q in i.demux(s) if q.size):
            p.pts = p.dts = n
            p.time_base, p.stream = Fraction(1, 30), out
            o.mux(p)
    for wins in ([(t / 2, t / 2 + 0.5) for t in range(8)], [(0.0, 0.5), (2.5, 3.0), (3.0, 3.5)]):
        _threads_agree(path, wins, 1)


def test_damaged_video_in_one_piece_whatever_the_threads(tmp_path):
    """MPEG-TS (decoded in one piece) with 8 bytes of a P/B-frame overwritten: the same segments and
    error whatever the number of threads, run after run."""
    path = str(tmp_path / 'v.ts')
    write_bframes(path, 3.0, {'threads': '1', 'x264-params': 'keyint=12:min-keyint=12:bframes=3:scenecut=0'})
    pk = _packets(path)
    data = bytearray(open(path, 'rb').read())
    for _, pos, size, key in pk[1:40:3]:  # several damaged frames, one per GOP or so
        data[pos + size // 2:pos + size // 2 + 8] = b'\xff' * 8
    open(path, 'wb').write(bytes(data))
    wins = [(t / 2, t / 2 + 0.5) for t in range(6)]
    one = _outcome(path, wins, 1)
    for threads in (2, 2, 3, 4):
        other = _outcome(path, wins, threads)
        assert _same(one[0], other[0]) and one[1] == other[1], threads


def test_damaged_slices_decode_as_on_one_ffmpeg_thread(tmp_path):
    """H.264 with 4 slices a frame, 4 bytes of a P-frame overwritten: FFmpeg's slice threads (PyAV's
    default, as many as cores) conceal it differently from one thread; step 3 decodes on one thread,
    so its frames are those of a one-thread decode on any machine."""
    import av
    path = str(tmp_path / 'v.mp4')
    write_bframes(path, 1.0, {'threads': '1', 'x264-params': 'keyint=30:min-keyint=30:slices=4:bframes=0:scenecut=0'},
                  size=(320, 192))
    _, pos, size, _ = _packets(path)[5]
    data = bytearray(open(path, 'rb').read())
    data[pos + size // 2:pos + size // 2 + 4] = b'\xff' * 4
    open(path, 'wb').write(bytes(data))

    def plain(threads):
        with av.open(path) as c:
            c.streams.video[0].codec_context.thread_count = threads
            return np.stack([f.to_ndarray(format='rgb24') for f in c.decode(video=0)])

    one = plain(1)
    assert len(one) == 30 and not np.array_equal(one, plain(2))  # the case tested
    (_, ours), = decode_segments(path, num=30, raw=True)  # every frame
    assert np.array_equal(ours.numpy(), one)


def test_damaged_hevc_parts_do_not_depend_on_the_threads(tmp_path):
    """HEVC (libx265's defaults: open GOPs, wavefront rows) with a bit flipped in the header of the CRA
    picture that starts the last part (FFmpeg marks nothing corrupt): the same frames whatever the number
    of threads. Each part has a decoder of its own: one that decoded another part before (flushed by the
    seek) decoded the damage differently, so the frames depended on which thread took which part."""
    path = str(tmp_path / 'v.mp4')
    write_bframes(path, 2.0, {'x265-params': 'keyint=24:min-keyint=24:log-level=0'}, codec='libx265', size=(320, 192))
    pk = _packets(path)
    cra = [p for p in pk if p[3]][2]  # frame 48
    data0 = open(path, 'rb').read()
    wins = [(t / 4, t / 4 + 0.25) for t in range(8)]
    for offset, bit in ((10, 4), (23, 1), (24, 1)):
        data = bytearray(data0)
        data[cra[1] + offset] ^= 1 << bit
        open(path, 'wb').write(bytes(data))
        stats = {}
        list(decode_segments(path, wins, stats=stats))
        assert stats['parts'] == 3
        one = _outcome(path, wins, 1)
        for threads in (2, 3, 3):
            other = _outcome(path, wins, threads)
            assert _same(one[0], other[0]) and one[1] == other[1], (offset, bit, threads)


def _threads_agree(path, wins, parts):
    """decode_segments with 1, 2 and 3 threads: the frames of a full decode, in ``parts`` parts
    (``'many'``: more than one)."""
    ref = list(decode_segments(path, wins, skip=False))
    for threads in (1, 2, 3):
        stats = {}
        assert _same(list(decode_segments(path, wins, threads=threads, stats=stats)), ref), threads
        assert stats['parts'] > 1 if parts == 'many' else stats['parts'] == parts, (threads, stats)


@pytest.mark.parametrize('codec, fmt', [('libx264', 'h264'), ('libx265', 'hevc')])
@pytest.mark.parametrize('ext', ['mp4', 'mkv'])
def test_parts_with_parameter_sets_repeated_after_four_byte_start_codes(tmp_path, codec, fmt, ext):
    """A raw Annex B stream with 4-byte start codes and SPS/PPS before every IDR picture (as hardware
    encoders write), muxed as `-c copy` does: FFmpeg's extradata keeps the zero byte of the next start
    code after the last parameter set, the packets do not. The same parameter sets: parts."""
    from fractions import Fraction
    import av
    src = str(tmp_path / f'v.{fmt}')
    params = 'keyint=12:min-keyint=12:bframes=0:scenecut=0'
    write_bframes(src, 3.0, {'threads': '1', 'x264-params': params} if fmt == 'h264' else
                  {'x265-params': params + ':open-gop=0:log-level=0'}, codec=codec, format=fmt)
    data = open(src, 'rb').read()
    open(src, 'wb').write(b''.join(b'\x00\x00\x00\x01' + n for n in re.split(b'\x00\x00\x00\x01|\x00\x00\x01', data) if n))
    path = str(tmp_path / f'v.{ext}')
    with av.open(src, format=fmt) as i, av.open(path, 'w') as o:
        out = o.add_stream_from_template(i.streams.video[0])
        out.time_base = Fraction(1, 30)
        for n, p in enumerate(q for q in i.demux(i.streams.video[0]) if q.size):
            p.pts = p.dts = n
            p.time_base, p.stream = Fraction(1, 30), out
            o.mux(p)
    with av.open(path) as c:
        assert bytes(c.streams.video[0].codec_context.extradata).endswith(b'\x00')  # the case tested
    _threads_agree(path, [(t / 2, t / 2 + 0.5) for t in range(5)], 'many')


@pytest.mark.parametrize('before', [b'\x00\x00\x00\x01\x0a', b'\x00\x00\x00\x01\x09'])
def test_one_byte_nal_does_not_hide_parameter_sets_sent_in_band(tmp_path, before):
    """Two clips joined in MP4 form (the first's extradata), the second's SPS and PPS (another
    chroma_qp_index_offset) in-band in its first packet, after a 1-byte NAL unit (end of sequence; a
    cut access unit delimiter): FFmpeg skips that unit and uses the new PPS, so must the scan (no
    parts), else the parts after it decode with the old PPS, other frames with 2 or 3 threads."""
    from fractions import Fraction
    import av
    fr = list(moving_texture_frames(4.0, 30, (160, 96)))
    gops = 'keyint=12:min-keyint=12:bframes=0:scenecut=0'
    a, b = str(tmp_path / 'a.mkv'), str(tmp_path / 'b.mkv')
    write_video(a, fr[:60], fps=30, options={'threads': '1', 'x264-params': gops})
    write_video(b, fr[60:], fps=30, options={'threads': '1', 'x264-params': gops + ':chroma-qp-offset=10'})
    with av.open(b) as c:
        sets = frames._extradata_parameter_sets(c.streams.video[0].codec_context)
    in_band = b''.join(len(s).to_bytes(4, 'big') + s for s in sorted(sets, key=lambda s: s[0] & 0x1f == 8))
    path = str(tmp_path / 'joined.mkv')
    with av.open(a) as ca, av.open(b) as cb, av.open(path, 'w') as o:
        out = o.add_stream_from_template(ca.streams.video[0])
        out.time_base = Fraction(1, 30)
        n = 0
        for c, head in ((ca, b''), (cb, before + in_band)):
            for k, p in enumerate(q for q in c.demux(c.streams.video[0]) if q.size):
                q = av.Packet((head if k == 0 else b'') + bytes(p))
                q.pts = q.dts = n
                q.time_base, q.stream, q.is_keyframe = Fraction(1, 30), out, p.is_keyframe
                o.mux(q)
                n += 1
    _threads_agree(path, [(t / 2, t / 2 + 0.5) for t in range(8)], 1)


def test_nal_scan_of_malformed_packets_and_records():
    """_scan and _extradata_parameter_sets on damaged bytes (lengths past the end, zero-length and
    1-byte NAL units, truncated records) raise nothing; an avcC with two SPS, two PPS and the high
    profiles' extra bytes gives all four."""
    import random
    from types import SimpleNamespace
    rng = random.Random(0)
    for codec in ('h264', 'hevc'):
        for size in (1, 2, 4):
            for _ in range(3000):
                data = bytes(rng.choice([0, 1, 2, 0x65, 0x26, 0x40, 0x67, 0xff]) for _ in range(rng.randint(0, 12)))
                frames._scan(memoryview(data), codec, size, {b'\x67\x01'})
        for _ in range(3000):
            x = b'\x01' + bytes(rng.randrange(256) for _ in range(rng.randint(0, 40)))
            frames._extradata_parameter_sets(SimpleNamespace(name=codec, extradata=x))
    assert frames._scan(memoryview(b'\x00\x00\x00\x01\x40' + b'\x00\x00\x00\x02\x67\x02'), 'hevc', 4, set()) == (False, True)
    sps, pps = [b'\x67\x64\x00\x0b\xac', b'\x67\x64\x00\x0b\xad\x80'], [b'\x68\xeb\xc3', b'\x68\xce\x38\x80']
    rec = (bytes([1, 0x64, 0, 0x0b, 0xff, 0xe2]) + b''.join(len(s).to_bytes(2, 'big') + s for s in sps) + b'\x02'
           + b''.join(len(s).to_bytes(2, 'big') + s for s in pps) + b'\xfd\xf8\xf8\x00')
    assert frames._extradata_parameter_sets(SimpleNamespace(name='h264', extradata=rec)) == set(sps + pps)
    assert frames._extradata_parameter_sets(SimpleNamespace(name='h264', extradata=rec[:-6])) is None


def test_edit_list_start_as_a_player_shows_it(tmp_path):
    """An mp4 cut without re-encoding (``ffmpeg -ss 1.3 -c copy``: an edit list hides the frames from the
    key frame before 1.3 s): step 1 counts and times only the frames a player shows, and step 3's
    windows start at the first of them and sample them alone."""
    import av
    from util.video import probe_video, segment_windows
    src, path = tmp_path / 'src.mp4', str(tmp_path / 'cut.mp4')
    write_video(src, (np.full((48, 64, 3), 3 * i, np.uint8) for i in range(80)), fps=10, gop=40)
    cut_with_edit_list(src, path, 1.3)
    with av.open(path) as c:
        shown = [f.to_ndarray(format='rgb24') for f in c.decode(video=0)]
    info = probe_video(path)
    assert (info.num_frames, info.duration) == (len(shown), 6.7) and len(shown) == 67
    wins = segment_windows(info.duration)
    starts = [0, 50]  # the windows [0, 5) and [5, 6.7) hold shown frames 0-49 and 50-66
    for threads in (1, 2):
        ours = list(decode_segments(path, wins, threads=threads, raw=True))
        assert [k for k, _ in ours] == [0, 1]
        for (k, x), a, b in zip(ours, starts, starts[1:] + [len(shown)]):
            assert np.array_equal(x.numpy(), np.stack([shown[a + i] for i in frame_indices(b - a)]))


@pytest.mark.parametrize('codec, options', [
    ('libvpx-vp9', {'g': '12', 'threads': '1', 'cpu-used': '8', 'auto-alt-ref': '1', 'lag-in-frames': '8'}),
    ('libsvtav1', {'g': '12', 'preset': '12', 'svtav1-params': 'log-level=1'}),
])
def test_edit_list_of_vp9_and_av1_in_parts(tmp_path, codec, options):
    """VP9 and AV1 in an mp4 cut without re-encoding inside a GOP: step 1 counts the frames a player
    shows, and step 3, in parts cut at key frames (the first one hidden by the edit list), gives them,
    whatever the threads."""
    import av
    from util.video import probe_video
    src, path = tmp_path / 'src.mp4', str(tmp_path / 'cut.mp4')
    write_bframes(src, 3.0, options, codec=codec)
    cut_with_edit_list(src, path, 0.5)  # frame 15, in the GOP of frames 12-23
    with av.open(path) as c:
        shown = np.stack([f.to_ndarray(format='rgb24') for f in c.decode(video=0)])
    assert len(shown) == probe_video(path).num_frames == 75
    wins = [(i / 30, (i + 1) / 30) for i in range(75)]  # one frame each
    for threads in (1, 2, 3):
        stats = {}
        ours = list(decode_segments(path, wins, threads=threads, stats=stats, raw=True))
        assert stats['parts'] > 1 and np.array_equal(np.stack([x[0].numpy() for _, x in ours]), shown)


def test_vp9_and_av1_key_frames():
    """The VP9 and AV1 headers read to cut at key frames: only a shown key frame (AV1: after a sequence
    header) starts a part; damaged bytes raise nothing."""
    import random
    assert frames._vp9_key(b'\x82\x49') and frames._vp9_key(b'\xb1')  # profile 0; profile 3 (reserved bit)
    assert not any(frames._vp9_key(b) for b in (b'\x86', b'\x88', b'\x80', b'\x02', b''))  # inter, shown existing, hidden
    seq, td = b'\x0a\x02\x00\x00', b'\x12\x00'  # sequence header (not a reduced still picture), temporal delimiter

    def frame(first, kind=6):  # an OBU of ``kind`` (6 frame, 3 frame header) with its size field
        return bytes([kind << 3 | 2, 2, first, 0])

    assert frames._av1_key(td + seq + frame(0x10)) and frames._av1_key(seq + frame(0x10, 3))  # shown key frame
    assert not frames._av1_key(frame(0x10))  # no sequence header in the unit
    assert not any(frames._av1_key(seq + frame(b)) for b in (0x00, 0x30, 0x80))  # hidden key, inter, shown existing
    assert frames._av1_key(b'\x0a\x01\x08' + frame(0xff))  # reduced still picture: a key frame
    assert frames._av1_key(seq + bytes([6 << 3 | 4 | 2, 0, 2, 0x10, 0]))  # a frame OBU with an extension byte
    rng = random.Random(0)
    for _ in range(3000):
        data = bytes(rng.choice([0, 2, 0x0a, 0x12, 0x32, 0x80, 0x82, 0xff]) for _ in range(rng.randint(0, 12)))
        frames._vp9_key(memoryview(data)), frames._av1_key(memoryview(data))


def test_hevc_file_starting_at_a_cra_with_rasl_frames(tmp_path):
    """An HEVC file cut at a CRA picture (its first packets the CRA and its RASL frames, which no
    decoder can decode): parts at the later CRAs give exactly the frames of a full decode."""
    import av
    from util.frames import _nal_length_size, _nal_type, _nal_units
    src, path = str(tmp_path / 'open.mkv'), str(tmp_path / 'cut.mkv')
    write_bframes(src, 4.0, {'x265-params': 'keyint=24:min-keyint=24:bframes=4:scenecut=0:log-level=0'}, codec='libx265')
    with av.open(src) as i, av.open(path, 'w') as o:
        s = i.streams.video[0]
        t, size, cras, on = o.add_stream_from_template(s), _nal_length_size(s.codec_context), 0, False
        for p in i.demux(s):
            if p.size and not on:
                cras += _nal_type(next(iter(_nal_units(bytes(p), size))), 'hevc') == 21
                on = cras == 2  # from the second CRA's packet on
            if p.size and on:
                p.stream = t
                o.mux(p)
    wins = [(t / 10, t / 10 + 0.1) for t in range(24)]  # the cut file: 2.5 s
    ref = list(decode_segments(path, wins, skip=False, raw=True))
    for threads in (1, 3):
        stats = {}
        got = list(decode_segments(path, wins, threads=threads, stats=stats, raw=True))
        assert [k for k, _ in got] == [k for k, _ in ref]
        assert all(torch.equal(a, b) for (_, a), (_, b) in zip(got, ref))
        assert stats['parts'] > 1


def test_mpeg_ts_whose_clock_wraps_keeps_its_first_frames(tmp_path):
    """An MPEG-TS whose 33-bit clock wraps 2 s in (FFmpeg gives the frames before the wrap negative
    timestamps): the decode starts at the first packet, not at time 0 (``seek(0)`` skipped the first
    2 s: window 0 took frame 20 eight times). Steps 1 and 3 see the same 4 s of frames."""
    import av
    from fractions import Fraction
    from util.video import probe_video
    path = str(tmp_path / 'wrap.ts')
    with av.open(path, 'w') as c:
        s = c.add_stream('libx264', rate=10, options={'threads': '1', 'x264-params': 'keyint=5:bframes=2:scenecut=0'})
        s.width, s.height, s.pix_fmt = 64, 48, 'yuv420p'
        s.codec_context.time_base = Fraction(1, 90000)
        for i, f in enumerate(moving_texture_frames(4, 10, (64, 48))):
            frame = av.VideoFrame.from_ndarray(f, 'rgb24')
            frame.pts, frame.time_base = 2 ** 33 - 2 * 90000 + i * 9000, Fraction(1, 90000)
            for p in s.encode(frame):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    with av.open(path) as c:
        shown = [f.to_ndarray(format='rgb24') for f in c.decode(video=0)]
    info = probe_video(path)
    assert (info.num_frames, info.duration) == (len(shown), 4.0) and len(shown) == 40
    for skip in (True, False):
        ours = list(decode_segments(path, [(0.0, 2.0), (2.0, 4.0)], skip=skip, raw=True))
        assert [k for k, _ in ours] == [0, 1]
        for (_, x), a in zip(ours, (0, 20)):
            assert np.array_equal(x.numpy(), np.stack([shown[a + i] for i in frame_indices(20)]))


@pytest.mark.parametrize('kind', ['divx_packed', 'h264'])
def test_avi_with_b_frames_in_presentation_order(tmp_path, kind):
    """AVI keeps each chunk's time in decode order and no presentation time: FFmpeg guesses the pts,
    and the decoder hands out frames of DivX's packed B-frames (Breakfast-era AVI) or of H.264 with
    B-frames with guessed pts out of order, in the right order. Step 3 samples and step 1 --reencode
    cuts the frames in the order shown (they used to take frames by those pts: a frame twice and its
    neighbour never; --reencode wrote the 2-4 s file with one frame)."""
    import av
    from util.synthetic import write_divx_packed_avi
    from util.video import reencode_segments
    path = str(tmp_path / 'v.avi')
    if kind == 'h264':
        write_bframes(path, 4.0, {'threads': '1'}, fps=15, size=(64, 48))
    else:
        write_divx_packed_avi(path, moving_texture_frames(4.0, 15, (64, 48)), fps=15)
    with av.open(path) as c:
        decoded = list(c.decode(video=0))
    shown, pts = np.stack([f.to_ndarray(format='rgb24') for f in decoded]), [f.pts for f in decoded]
    assert len(shown) == 60 and pts != sorted(pts)  # the guessed pts: out of order
    wins = [(i / 15, (i + 1) / 15) for i in range(60)]  # one frame each
    for threads in (1, 2):
        ours = list(decode_segments(path, wins, threads=threads, raw=True))
        assert np.array_equal(np.stack([x[0].numpy() for _, x in ours]), shown)
    files = [str(tmp_path / f'{k}.mp4') for k in range(2)]
    assert reencode_segments(path, [(0.0, 2.0), (2.0, 4.0)], files) == [30, 30]
