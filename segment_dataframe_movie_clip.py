"""Step 4: dataset CSVs (one row per video) that point into the embedding store.

  python segment_dataframe_movie_clip.py --dataset lvu --annotation_dir lvu_1.0 --embedding_dir E --output_dir csv
  python segment_dataframe_movie_clip.py --dataset breakfast --annotation_dir splits --embedding_dir E --output_dir csv
  python segment_dataframe_movie_clip.py --dataset coin --annotation_file COIN.json --embedding_dir E --output_dir csv
  python segment_dataframe_movie_clip.py --dataset pretrain --embedding_dir E [--embedding_dir E2] --out_csv F \\
      [--exclude_csv csv/*/val.csv csv/*/test.csv]
  python segment_dataframe_movie_clip.py --combine a.csv b.csv --out_csv combined.csv

Labelled datasets write ``<output_dir>/<task>/{train,val,test}.csv`` (video_id, embedding_path,
number_of_segments, label, label_name, split), ``task.json`` and ``summary.json`` (per split: annotated
rows, rows written, videos without embeddings). ``--legacy_root R`` reads the original release's
per-segment files instead of a store and writes a ``segment_paths`` column. Pretraining CSVs leave out
every video listed in ``--exclude_csv`` files and get a ``<name>_summary.json`` beside them.
The annotation readers are in util/annotations.py, the CSV building in util/dataset_csv.py.
"""
import argparse
import json
import os

import pandas as pd

from util.annotations import (AnnotationError, breakfast_task, check_splits, hold_out_val, lvu_tasks,  # noqa: F401
                              read_coin)
from util.dataset_csv import EncoderCheck, excluded_ids, find_embeddings, store_header, write_csv
from util.embeddings import EXTENSION, EmbeddingError, read_csv
from util.errors import run_main
from util.fileio import atomic_write_text
from util.legacy import legacy_videos
from util.tasks import SPLITS


def get_args_parser():
    p = argparse.ArgumentParser(description='Step 4: dataset CSVs from annotations and the embedding store')
    p.add_argument('--dataset', choices=['lvu', 'breakfast', 'coin', 'pretrain'])
    p.add_argument('--annotation_dir', help='lvu: the lvu_1.0 folder; breakfast: folder with train.csv/test.csv')
    p.add_argument('--annotation_file', help='coin: COIN.json')
    p.add_argument('--embedding_dir', action='append', default=[],
                   help='store folder (<video_id>.safetensors); repeat to search several, first match wins')
    p.add_argument('--legacy_root', action='append', default=[],
                   help="original release's <root>/<video_id>/<start>-<end>/langbind_output.pt files "
                        '(writes a segment_paths column); repeatable')
    p.add_argument('--output_dir', '--out_dir', dest='output_dir',
                   help='CSV root: writes <output_dir>/<task>/{train,val,test}.csv')
    p.add_argument('--out_csv', help='pretrain / --combine output CSV')
    p.add_argument('--exclude_csv', nargs='+', default=[], metavar='CSV',
                   help='pretrain / --combine: leave out every video_id listed in these CSVs (e.g. the val and '
                        'test CSVs of the evaluation tasks: pretraining must never see evaluation videos)')
    p.add_argument('--tasks', nargs='+', help='lvu: only these task folders ("lvu" = the 9 LVU tasks)')
    p.add_argument('--val_fraction', type=float, default=0.1,
                   help='breakfast/coin: part of each training class held out as val')
    p.add_argument('--seed', type=int, default=0, help='seed of the val hold-out')
    p.add_argument('--combine', nargs='+', metavar='CSV',
                   help='concatenate label-free CSVs into --out_csv, dropping repeated video_ids')
    return p


# ---------------------------------------------------------------- labelled datasets

def annotated_tasks(args):
    """``[(Task, {split: rows}, {split: repeated rows dropped})]``; a video in two splits or with two
    labels stops the run (util.annotations.check_splits)."""
    if args.dataset == 'lvu':
        out = []
        for task, splits in lvu_tasks(args.annotation_dir, args.tasks):
            splits, repeats = check_splits(task.name, splits)
            out.append((task, splits, repeats))
        return out
    task, train, test = (breakfast_task(args.annotation_dir) if args.dataset == 'breakfast'
                         else read_coin(args.annotation_file))
    splits, repeats = check_splits(task.name, {'train': train, 'test': test})
    train, val = hold_out_val(splits['train'], args.val_fraction, args.seed)
    return [(task, {'train': train, 'val': val, 'test': splits['test']}, {**repeats, 'val': 0})]


def task_records(args, task, splits, encoders):
    """Per split, the CSV rows of the videos with embeddings and ``{video_id: why}`` of those without."""
    out = {}
    for split in SPLITS:
        records, missing = [], {}
        for r in splits[split]:
            fields, metadata, problem = find_embeddings(r.video_id, args.embedding_dir, args.legacy_root)
            if fields is None:
                missing[r.video_id] = problem
                continue
            if 'embedding_path' in fields:
                encoders.add(fields['embedding_path'], metadata)
            records.append({'video_id': r.video_id, **fields, 'label': r.label, 'label_name': r.label_name,
                            'split': split})
        out[split] = records, missing
    return out


def write_task(args, task, splits, repeats, records):
    """CSVs of one task, its task.json and summary.json; returns the number of rows without embeddings."""
    folder = os.path.join(args.output_dir, task.name)
    summary, missing_total = {}, 0
    for split in SPLITS:
        rows, missing = records[split]
        write_csv(os.path.join(folder, split + '.csv'), rows, ('label', 'label_name', 'split'))
        summary[split] = {'annotated': len(splits[split]), 'written': len(rows),
                          'missing': len(splits[split]) - len(rows), 'missing_videos': missing}
        if repeats.get(split):
            summary[split]['repeated_rows'] = repeats[split]
        missing_total += summary[split]['missing']
        print(f'{task.name}/{split}: {len(rows)} of {len(splits[split])} annotated videos have embeddings'
              + (f', {summary[split]["missing"]} missing' if missing else ''))
        if not rows:
            print(f'WARNING: {os.path.join(folder, split + ".csv")} has no rows')
    task.save(folder)
    atomic_write_text(os.path.join(folder, 'summary.json'), json.dumps(summary, indent=1))
    return missing_total


def labelled(args):
    tasks = annotated_tasks(args)
    encoders = EncoderCheck()   # one encoder across everything this run writes, checked before writing
    records = [task_records(args, task, splits, encoders) for task, splits, _ in tasks]
    missing = sum(write_task(args, *t, r) for t, r in zip(tasks, records))
    if missing:
        print(f'{missing} annotated videos have no embeddings: listed per split in '
              f'{os.path.join(args.output_dir, "<task>", "summary.json")}')
    return missing


# ---------------------------------------------------------------- label-free (pretraining) CSVs

def summary_path(out_csv):
    return os.path.splitext(out_csv)[0] + '_summary.json'


def left_out(exclude, csv_paths):
    """Console line and summary fields for the videos left out by --exclude_csv."""
    if csv_paths:
        print(f'--exclude_csv: {len(exclude)} videos left out (listed in {", ".join(map(str, csv_paths))})')
    return {'exclude_csv': [os.path.abspath(c) for c in csv_paths], 'excluded': len(exclude),
            'excluded_videos': sorted(exclude)}


def pretrain_csv(args):
    """One label-free row per video found in the stores / legacy roots (first one wins), less the videos
    listed in --exclude_csv."""
    exclude = excluded_ids(args.exclude_csv)
    vids = []
    for d in args.embedding_dir:
        vids += sorted(f[:-len(EXTENSION)] for f in os.listdir(d) if f.endswith(EXTENSION))
    for root in args.legacy_root:
        vids += list(legacy_videos(root))
    records, bad, seen, excluded = [], {}, set(), set()
    encoders = EncoderCheck()
    for vid in vids:
        if vid in seen:
            continue
        seen.add(vid)
        if vid in exclude:
            excluded.add(vid)
            continue
        fields, metadata, problem = find_embeddings(vid, args.embedding_dir, args.legacy_root)
        if fields is None:
            bad[vid] = problem
            print(f'skipped {vid}: {problem}')
            continue
        if 'embedding_path' in fields:
            encoders.add(fields['embedding_path'], metadata)
        records.append({'video_id': vid, **fields})
    write_csv(args.out_csv, records)
    summary = {'videos': len(records), 'repeated_ids': len(vids) - len(seen), 'unreadable': bad,
               **left_out(excluded, args.exclude_csv)}
    atomic_write_text(summary_path(args.out_csv), json.dumps(summary, indent=1))
    print(f'{args.out_csv}: {len(records)} videos ({len(vids) - len(seen)} repeated ids, {len(bad)} unreadable '
          f'files skipped, {len(excluded)} excluded)')
    return records, bad


def combine(args):
    """Concatenate label-free CSVs (paths made absolute); a repeated video_id keeps its first row; videos
    listed in --exclude_csv are left out. Returns the number of repeated video ids removed."""
    exclude = excluded_ids(args.exclude_csv)
    records, seen, repeated, excluded = [], set(), 0, set()
    encoders = EncoderCheck()
    for c in args.combine:
        rows = read_csv(c)
        counts = pd.read_csv(c, dtype={'video_id': str}, keep_default_na=False).get('number_of_segments')
        if counts is None:
            raise EmbeddingError(f'{c}: needs a "number_of_segments" column')
        for r, n in zip(rows, counts):
            if r['video_id'] in seen:
                repeated += 1
                continue
            seen.add(r['video_id'])
            if r['video_id'] in exclude:
                excluded.add(r['video_id'])
                continue
            try:
                n = int(n)
            except ValueError:
                raise EmbeddingError(f'{c} row {r["row"]}: number_of_segments {n!r} is not an integer') from None
            src = r['source']
            if isinstance(src, list):
                location = ('segment_paths', repr([os.path.normpath(p) for p in src]))
            else:
                location = ('embedding_path', os.path.normpath(src))
                try:
                    metadata = store_header(location[1])[1]
                except EmbeddingError:
                    metadata = None   # a missing or unreadable file is reported by pretraining, which reads it
                if metadata is not None:
                    encoders.add(location[1], metadata)
            records.append({'video_id': r['video_id'], location[0]: location[1], 'number_of_segments': n})
    write_csv(args.out_csv, records)
    summary = {'videos': len(records), 'combined': [os.path.abspath(c) for c in args.combine],
               'repeated_ids': repeated, **left_out(excluded, args.exclude_csv)}
    atomic_write_text(summary_path(args.out_csv), json.dumps(summary, indent=1))
    print(f'{args.out_csv}: {len(records)} videos from {len(args.combine)} CSVs, {repeated} repeated video ids '
          f'removed, {len(excluded)} excluded')
    return repeated


def main(args):
    if args.combine:
        return combine(args)
    for d in args.embedding_dir + args.legacy_root:
        if not os.path.isdir(d):
            raise EmbeddingError(f'{d}: embedding folder not found')
    if args.dataset == 'pretrain':
        return pretrain_csv(args)
    return labelled(args)


def check_args(parser, args):
    if args.combine:
        if not args.out_csv:
            parser.error('--combine needs --out_csv')
        return
    if not args.dataset:
        parser.error('give --dataset or --combine')
    if not (args.embedding_dir or args.legacy_root):
        parser.error('give --embedding_dir (or --legacy_root)')
    need = {'pretrain': 'out_csv', 'coin': 'annotation_file'}.get(args.dataset, 'annotation_dir')
    for flag in (need, 'output_dir') if args.dataset != 'pretrain' else (need,):
        if not getattr(args, flag):
            parser.error(f'--dataset {args.dataset} needs --{flag}')
    if args.exclude_csv and args.dataset != 'pretrain':
        parser.error('--exclude_csv is for --dataset pretrain and --combine')
    if not 0 <= args.val_fraction < 1:
        parser.error('--val_fraction must be in [0, 1)')


if __name__ == '__main__':
    parser = get_args_parser()
    args = parser.parse_args()
    check_args(parser, args)
    run_main(main, args)
