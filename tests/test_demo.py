"""`make demo` (tools/demo.py) at its smallest size: every artefact, the final table, reuse on a rerun."""
import glob
import json
import math
import os
import subprocess
import sys

import pandas as pd
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, 'tools'))
import demo  # noqa: E402  (tools/ is not a package)

TASKS = ['plot', 'direction', 'tint']
PROBES = ['ap_raw', 'lp_raw', 'ap_untrained', 'lp_untrained', 'lp', 'ap']


def run_demo(out):
    env = dict(os.environ)
    env.pop('LANGBIND_PATH', None)
    p = subprocess.run([sys.executable, 'tools/demo.py', '--output_dir', str(out), '--size', 'tiny'], cwd=ROOT,
                       env=env, capture_output=True, text=True)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p.stdout


@pytest.mark.slow
def test_demo_tiny_chain(tmp_path):
    out = tmp_path / 'demo'
    log = run_demo(out)
    # the README's commands, as a user types them, and the random-encoder warning
    for cmd in ('python tools/make_demo_data.py --output_dir', 'python segment_video_library_movie_clip.py --video_dir',
                'python prepare_paired_paths.py --segments_csv', 'python langbind_preprocessing.py --video_path_file',
                'python segment_dataframe_movie_clip.py --dataset lvu', 'python main_pretrain.py --input_size 64',
                'python test_ap_movie_clip.py --task plot direction tint', 'python test_lp_movie_clip.py'):
        assert '$ ' + cmd in log, cmd
    commands = [line for line in log.splitlines() if line.startswith('$ python test_')]
    assert len(commands) == 6 and sum('--baseline raw' in c for c in commands) == 2
    assert sum('--baseline random_init --resume' in c for c in commands) == 2
    assert 'python segment_dataframe_movie_clip.py --dataset pretrain --embedding_dir' in log
    assert log.count('RANDOM encoder') >= 3

    videos = sorted(os.path.basename(p)[:-4] for p in glob.glob(str(out / 'data/videos/*.mp4')))
    assert len(videos) == 9
    segments = pd.read_csv(out / 'segments/segments_metadata.csv')
    assert sorted(segments['video_id'].unique()) == videos
    assert os.path.isfile(out / 'segments/paired_paths.json')
    stores = sorted(os.path.basename(p)[:-12] for p in glob.glob(str(out / 'embeddings/*.safetensors')))
    assert stores == videos
    unlabelled = sorted(os.path.basename(p)[:-4] for p in glob.glob(str(out / 'data/unlabelled/*.mp4')))
    assert len(unlabelled) == 4 and not set(unlabelled) & set(videos)
    stores = sorted(os.path.basename(p)[:-12] for p in glob.glob(str(out / 'embeddings_unlabelled/*.safetensors')))
    assert stores == unlabelled
    for task in TASKS:
        for split in ('train', 'val', 'test'):
            assert len(pd.read_csv(out / 'csv' / task / f'{split}.csv')) > 0
        assert os.path.isfile(out / 'csv' / task / 'task.json')
    # pretraining sees the unlabelled videos only
    assert sorted(pd.read_csv(out / 'csv/pretrain_train.csv')['video_id']) == unlabelled
    checkpoint = out / 'pretrain/checkpoint-1.pth'
    assert os.path.isfile(checkpoint)
    # the untrained control is labelled as such; the reconstruction picture is a PNG
    with open(out / 'probes/ap_untrained/results.json') as f:
        assert json.load(f)['baseline'] == 'random_init'
    with open(out / 'reconstruction.png', 'rb') as f:
        assert f.read(8) == b'\x89PNG\r\n\x1a\n'
    assert glob.glob(str(out / 'pretrain/tensorboard/events.out.tfevents.*'))
    for name in PROBES:
        with open(out / 'probes' / name / 'results.json') as f:
            res = json.load(f)
        assert res['random_encoder'] is True and sorted(res['tasks']) == sorted(TASKS)
        assert all('test_mean' in r for r in res['tasks'].values())

    # the final table: one row per task, a number in range in every column
    with open(out / 'demo_results.json') as f:
        summary = json.load(f)
    assert summary['random_encoder'] is True and 'RANDOM' in summary['title']
    assert list(summary['tasks']) == TASKS
    for task, row in summary['tasks'].items():
        assert row['metric'] == 'top1'
        values = [row['chance']] + [row[n] for n in PROBES]
        assert all(isinstance(v, float) and math.isfinite(v) and 0 <= v <= 100 for v in values), row
    assert summary['tasks']['direction']['chance'] == 50.0  # balanced, two classes
    with open(out / 'demo_results.md') as f:
        md = f.read()
    assert 'RANDOM' in md.splitlines()[0]
    assert md.splitlines()[2] == '| method | plot (order) | direction (order) | tint (pooling) |'
    rows = [line for line in md.splitlines() if line.startswith('| ') and not line.startswith('| method')]
    assert [r.split(' | ')[0][2:] for r in rows] == ['chance'] + [demo.COLUMNS[n] for n in PROBES]
    assert all(r.count('|') == 5 for r in rows)
    assert summary['artefacts']['reconstruction_picture'] == str(out / 'reconstruction.png')
    for path in summary['artefacts']['probe_results'] + [summary['artefacts']['checkpoint']]:
        assert os.path.isfile(path)

    # a rerun reuses every finished step
    mtimes = {p: os.path.getmtime(p) for p in glob.glob(str(out / 'embeddings/*.safetensors')) + [str(checkpoint)]}
    log = run_demo(out)
    assert 'already generated with these arguments, reused' in log
    assert 'pretraining: ' in log and log.count('is newer than its inputs, skipped') == len(PROBES)
    assert 'main_pretrain.py' not in log and 'test_ap_movie_clip.py' not in log
    assert 'visualize_reconstruction.py' not in log
    assert mtimes == {p: os.path.getmtime(p) for p in mtimes}
    with open(out / 'demo_results.json') as f:
        assert json.load(f)['tasks'] == summary['tasks']


def test_fresh_clears_folders_made_from_other_inputs(tmp_path):
    folder = str(tmp_path / 'embeddings')
    demo.fresh(folder, {'data': 1})
    open(os.path.join(folder, 'a.safetensors'), 'w').close()
    demo.fresh(folder, {'data': 1})  # same inputs: kept
    assert os.path.isfile(os.path.join(folder, 'a.safetensors'))
    demo.fresh(folder, {'data': 2})  # other generated data: cleared
    assert os.listdir(folder) == ['demo_inputs.json']
    os.remove(os.path.join(folder, 'demo_inputs.json'))
    open(os.path.join(folder, 'b.safetensors'), 'w').close()
    demo.fresh(folder, {'data': 2})  # no record: made by something else, cleared
    assert os.listdir(folder) == ['demo_inputs.json']


def test_failing_step_stops_the_demo_with_its_name_and_status(tmp_path):
    with pytest.raises(SystemExit) as e:
        demo.run('generate the benchmark', 'tools/make_demo_data.py', '--out_dir', tmp_path, '--num_videos', 2)
    assert str(e.value) == 'demo: step "generate the benchmark" failed with exit status 1'
