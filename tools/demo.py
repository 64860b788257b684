"""`make demo`: the numbered data steps, pretraining and both probes on a generated long-video benchmark.

    python tools/demo.py [--output_dir demo_out] [--size small|tiny] [--model_path DIR] [--seeds 0 1 2]

Every command is printed as a user would type it, then run with this Python. Steps 2 and 3 skip finished
videos, pretraining resumes (and is skipped once its last checkpoint exists), a probe is skipped when its
results are newer than the embeddings and the checkpoint. Each output folder records what it was made from
(``demo_inputs.json``); when that changes (other generated data, encoder or settings) the folder is cleared
first, so stale embeddings or checkpoints are never reused. Without LanguageBind weights (``--model_path`` or the
LANGBIND_PATH environment variable) the encoder is randomly initialised: the run then checks the pipeline
and says nothing about real videos.
"""
import argparse
import datetime
import glob
import json
import os
import shlex
import shutil
import subprocess
import sys
import time

import pandas as pd


from make_demo_data import ORDER_TASKS, TASKS  # tools/ is this script's folder
from util.embeddings import load_video_embeddings, read_csv, read_metadata
from util.fileio import atomic_write_text

TASK_NAMES = list(TASKS)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZES = {  # generator, pretraining and probe settings of each size
    'small': dict(
        data=[],
        pretrain=['--batch_size', '16', '--depth', '2', '--num_heads', '4', '--decoder_embed_dim', '64',
                  '--decoder_depth', '1', '--decoder_num_heads', '4', '--num_patches', '32', '--mask_ratio', '.5',
                  '--lr', '3e-3', '--warmup_epochs', '2', '--save_every', '60', '--eval_every', '10',
                  '--input_scale', 'auto'],
        epochs=60, probe=['--batch_size', '16', '--lr', '3e-3'], probe_epochs=60, seeds=[0, 1, 2]),
    'tiny': dict(
        data=['--num_videos', '9', '--num_unlabelled', '4', '--min_segments', '6', '--max_segments', '6',
              '--size', '32'],
        pretrain=['--batch_size', '4', '--depth', '1', '--num_heads', '2', '--decoder_embed_dim', '32',
                  '--decoder_depth', '1', '--decoder_num_heads', '2', '--num_patches', '8', '--mask_ratio', '.5',
                  '--lr', '1e-3', '--warmup_epochs', '1', '--save_every', '1', '--eval_every', '1'],
        epochs=2, probe=['--batch_size', '4', '--lr', '3e-3'], probe_epochs=3, seeds=[0]),
}
# (name, probe, encoder): raw = the segment embeddings, untrained = the LV-MAE architecture freshly
# initialised (no pretraining), pretrained = the pretraining run's last checkpoint
PROBES = [('ap_raw', 'ap', 'raw'), ('lp_raw', 'lp', 'raw'), ('ap_untrained', 'ap', 'untrained'),
          ('lp_untrained', 'lp', 'untrained'), ('lp', 'lp', 'pretrained'), ('ap', 'ap', 'pretrained')]
COLUMNS = {'ap_raw': 'raw AP', 'lp_raw': 'raw LP', 'ap_untrained': 'untrained AP', 'lp_untrained': 'untrained LP',
           'lp': 'LV-MAE LP', 'ap': 'LV-MAE AP'}
RANDOM_NOTE = ('RANDOM encoder (randomly initialised LanguageBind): a pipeline check, not a result about '
               'real videos')


def get_args_parser():
    p = argparse.ArgumentParser('LV-MAE demo on a generated long-video benchmark')
    p.add_argument('--output_dir', '--out_dir', dest='out_dir', default='demo_out',
                   help='everything the demo writes goes here')
    p.add_argument('--size', default='small', choices=sorted(SIZES), help='tiny: the smallest chain (tests)')
    p.add_argument('--model_path', default=os.environ.get('LANGBIND_PATH'),
                   help='local LanguageBind video checkpoint (default: $LANGBIND_PATH); '
                        'none: a randomly initialised tiny encoder')
    p.add_argument('--seeds', default=None, type=int, nargs='+', help='probe seeds (default: by --size)')
    p.add_argument('--epochs', default=None, type=int, help='pretraining epochs (default: by --size)')
    p.add_argument('--probe_epochs', default=None, type=int, help='probe epochs (default: by --size)')
    p.add_argument('--device', default=None, help='pretraining and probe device (default: cuda if available)')
    return p


def banner(text):
    line = '#' * (len(text) + 4)
    print(f'\n{line}\n# {text} #\n{line}', flush=True)


def run(name, script, *args):
    """Print ``python <script> <args>`` as a user would type it, run it with this Python, stop on failure."""
    path = os.path.relpath(os.path.join(ROOT, script))
    print(f'\n=== {name}\n$ {shlex.join(["python", path, *map(str, args)])}', flush=True)
    start = time.time()
    rc = subprocess.run([sys.executable, path, *map(str, args)]).returncode
    if rc != 0:
        sys.exit(f'demo: step "{name}" failed with exit status {rc}')
    print(f'--- {name}: done in {time.time() - start:.1f} s', flush=True)


def fresh(folder, inputs):
    """Clear ``folder`` unless it was made from ``inputs`` (recorded in demo_inputs.json); record them."""
    record = os.path.join(folder, 'demo_inputs.json')
    text = json.dumps(inputs, sort_keys=True)
    if os.path.exists(folder):
        if os.path.isfile(record):
            with open(record) as f:
                if f.read() == text:
                    return
        print(f'{folder}: made from other inputs, cleared', flush=True)
        shutil.rmtree(folder)
    os.makedirs(folder)
    atomic_write_text(record, text)


def is_newer(path, inputs):
    return os.path.isfile(path) and all(os.path.getmtime(path) > os.path.getmtime(p) for p in inputs)


def chance(csv_dir, task):
    """Majority-class accuracy (%) on test, or the MSE on test of predicting the train mean."""
    train, test = (pd.read_csv(os.path.join(csv_dir, task, f'{s}.csv')) for s in ('train', 'test'))
    if TASKS[task] is None:
        return float(((test['label'] - train['label'].mean()) ** 2).mean())
    return float(100 * test['label'].value_counts().max() / len(test))


def probe_row(task, results, csv_dir):
    """One task's row of the final table: metric, chance and each probe's test mean and std (None if skipped)."""
    row = {'metric': 'mse' if TASKS[task] is None else 'top1', 'chance': chance(csv_dir, task)}
    for name, _, _ in PROBES:
        entry = results[name].get(task) or {}
        row[name], row[name + '_std'] = entry.get('test_mean'), entry.get('test_std')
    return row


def results_table(summary):
    """The final table (markdown): one row per method (chance first), one column per task."""
    tasks = summary['tasks']
    kind = lambda t: 'order' if t in ORDER_TASKS else 'pooling'
    lines = [f'### {summary["title"]}', '',
             '| method | ' + ' | '.join(f'{t} ({kind(t)})' for t in tasks) + ' |', '|---' * (1 + len(tasks)) + '|',
             '| chance | ' + ' | '.join(f'{row["chance"]:.1f}' for row in tasks.values()) + ' |']
    for n, _, _ in PROBES:
        cells = ['skipped' if row[n] is None else f'{row[n]:.1f}'
                 + (f' ± {row[n + "_std"]:.1f}' if len(summary['seeds']) > 1 else '') for row in tasks.values()]
        lines.append(f'| {COLUMNS[n]} | ' + ' | '.join(cells) + ' |')
    lines += ['', f'Test top-1 % at the epoch with the best val score, mean ± std over {len(summary["seeds"])} '
              'seed(s); chance: majority class on test. raw: the probe on the segment embeddings (no LV-MAE); '
              'untrained: the probe on the LV-MAE architecture freshly initialised (no pretraining); LV-MAE: on '
              'the pretrained encoder. order tasks: only the order of scenes across the video decides the label '
              '(a mean over segments cannot); pooling: a property visible in every segment (the tint) decides it. '
              f'{summary["date"]}, this run {summary["wall_time_s"] / 60:.1f} min, size {summary["size"]}.']
    if summary['random_encoder']:
        lines.append(f'\n**{RANDOM_NOTE}.**')
    return '\n'.join(lines) + '\n'


def main(args):
    start = time.time()
    size = SIZES[args.size]
    epochs = args.epochs or size['epochs']
    probe_epochs = args.probe_epochs or size['probe_epochs']
    seeds = args.seeds or size['seeds']
    out = args.out_dir
    d = {k: os.path.join(out, k) for k in ('data', 'segments', 'embeddings', 'segments_unlabelled',
                                           'embeddings_unlabelled', 'csv', 'pretrain', 'probes')}
    random_encoder = not args.model_path
    encoder = ['--random_init', 'tiny'] if random_encoder else ['--model_path', args.model_path]
    if random_encoder:
        banner(f'No LanguageBind weights given (--model_path or LANGBIND_PATH): {RANDOM_NOTE}')
    device = ['--device', args.device] if args.device else []

    run('generate the benchmark (tools/make_demo_data.py)', 'tools/make_demo_data.py', '--output_dir', d['data'],
        *size['data'])
    with open(os.path.join(d['data'], 'stamp.json')) as f:
        inputs = {'data': json.load(f), 'encoder': encoder}
    for k in ('segments', 'embeddings', 'segments_unlabelled', 'embeddings_unlabelled', 'csv'):
        fresh(d[k], inputs)

    for which, videos, suffix in (('labelled', 'videos', ''), ('unlabelled', 'unlabelled', '_unlabelled')):
        segments_csv = os.path.join(d['segments' + suffix], 'segments_metadata.csv')
        jobs = os.path.join(d['segments' + suffix], 'paired_paths.json')
        run(f'step 1: segments ({which} videos)', 'segment_video_library_movie_clip.py',
            '--video_dir', os.path.join(d['data'], videos), '--output_dir', d['segments' + suffix])
        run(f'step 2: job file ({which} videos)', 'prepare_paired_paths.py', '--segments_csv', segments_csv,
            '--embedding_dir', d['embeddings' + suffix])
        if random_encoder:
            banner(RANDOM_NOTE)
        run(f'step 3: segment embeddings ({which} videos)', 'langbind_preprocessing.py', '--video_path_file', jobs,
            *encoder)
    run('step 4: task CSVs', 'segment_dataframe_movie_clip.py', '--dataset', 'lvu',
        '--annotation_dir', os.path.join(d['data'], 'lvu_1.0'), '--embedding_dir', d['embeddings'],
        '--output_dir', d['csv'])
    # pretraining: the unlabelled videos; its validation loss on the labelled val videos (labels unused)
    pretrain_csv = {s: os.path.join(d['csv'], f'pretrain_{s}.csv') for s in ('train', 'val')}
    run('step 5: pretraining CSV (unlabelled videos)', 'segment_dataframe_movie_clip.py', '--dataset', 'pretrain',
        '--embedding_dir', d['embeddings_unlabelled'], '--out_csv', pretrain_csv['train'])
    run('step 5: pretraining validation CSV (val videos, labels dropped)', 'segment_dataframe_movie_clip.py',
        '--combine', os.path.join(d['csv'], TASK_NAMES[0], 'val.csv'), '--out_csv', pretrain_csv['val'])

    first = pd.read_csv(pretrain_csv['train'])['embedding_path'][0]
    input_size = load_video_embeddings(first).shape[1]
    random_encoder = read_metadata(first).get('random_init') == '1'
    pretrain_args = ['--input_size', input_size, *size['pretrain'], '--epochs', epochs, *device]
    inputs = dict(inputs, pretrain=list(map(str, pretrain_args)))
    fresh(d['pretrain'], inputs)
    checkpoint = os.path.join(d['pretrain'], f'checkpoint-{epochs - 1}.pth')
    if os.path.isfile(checkpoint):
        print(f'\n=== pretraining: {checkpoint} exists, skipped')
    else:
        run('pretraining', 'main_pretrain.py', *pretrain_args, '--data_path', pretrain_csv['train'],
            '--val_data_path', pretrain_csv['val'], '--output_dir', d['pretrain'],
            '--log_dir', os.path.join(d['pretrain'], 'tensorboard'), '--num_workers', 0)
    picture = os.path.join(out, 'reconstruction.png')
    if not is_newer(picture, [checkpoint]):
        video = read_csv(pretrain_csv['val'])[0]['source']   # a validation video, unseen in pretraining
        run('what the model reconstructs (one validation video)', 'tools/visualize_reconstruction.py',
            '--resume', checkpoint, '--embedding_path', video, '--seed', 0, '--out', picture, *device)

    tasks = TASK_NAMES
    probe_args = ['--task', *tasks, '--data_path', d['csv'], *size['probe'], '--epochs', probe_epochs,
                  '--seeds', *seeds, *device]
    fresh(d['probes'], dict(inputs, probe=list(map(str, probe_args))))
    stores = glob.glob(os.path.join(glob.escape(d['embeddings']), '*.safetensors'))  # step 4 rewrites the CSVs
    sources = {'raw': ['--baseline', 'raw'], 'untrained': ['--baseline', 'random_init', '--resume', checkpoint],
               'pretrained': ['--resume', checkpoint]}
    results = {}
    for name, probe, source in PROBES:
        folder = os.path.join(d['probes'], name)
        result = os.path.join(folder, 'results.json')
        if is_newer(result, stores + ([] if source == 'raw' else [checkpoint])):
            print(f'\n=== probe {name}: {result} is newer than its inputs, skipped')
        else:
            run(f'probe: {COLUMNS[name]}', f'test_{probe}_movie_clip.py', *probe_args, *sources[source],
                '--output_dir', folder)
        with open(result) as f:
            results[name] = json.load(f)['tasks']

    artefacts = {
        'segments': os.path.join(d['segments'], 'segments_metadata.csv'), 'embeddings': d['embeddings'],
        'embeddings_unlabelled': d['embeddings_unlabelled'],
        'task_csvs': [os.path.join(d['csv'], t) for t in tasks], 'pretrain_csv': pretrain_csv['train'],
        'checkpoint': checkpoint, 'reconstruction_picture': picture,
        'pretrain_log': os.path.join(d['pretrain'], 'log.txt'),
        'tensorboard': os.path.join(d['pretrain'], 'tensorboard'),
        'probe_results': [os.path.join(d['probes'], n, 'results.json') for n, _, _ in PROBES]}
    summary = {'title': 'LV-MAE demo results' + (f' ({RANDOM_NOTE})' if random_encoder else ''),
               'random_encoder': random_encoder, 'encoder': ' '.join(encoder), 'size': args.size, 'seeds': seeds,
               'date': str(datetime.date.today()), 'wall_time_s': round(time.time() - start, 1),
               'tasks': {t: probe_row(t, results, d['csv']) for t in tasks}, 'artefacts': artefacts}
    md = results_table(summary)
    atomic_write_text(os.path.join(out, 'demo_results.md'), md)
    atomic_write_text(os.path.join(out, 'demo_results.json'), json.dumps(summary, indent=1) + '\n')
    if random_encoder:
        banner(RANDOM_NOTE)
    print('\n' + md)
    print('Artefacts:')
    for k, v in artefacts.items():
        print(f'  {k}: {", ".join(v) if isinstance(v, list) else v}')
    print(f'  table: {os.path.join(out, "demo_results.md")} and demo_results.json\n'
          f'  TensorBoard: tensorboard --logdir {os.path.join(d["pretrain"], "tensorboard")}')


if __name__ == '__main__':
    main(get_args_parser().parse_args())
