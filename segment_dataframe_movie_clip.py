"""Step 4: dataset CSVs (one row per video) that point into the embedding store.

  python segment_dataframe_movie_clip.py --dataset lvu --annotation_dir lvu_1.0 --embedding_dir E --out_dir csv
  python segment_dataframe_movie_clip.py --dataset breakfast --annotation_dir splits --embedding_dir E --out_dir csv
  python segment_dataframe_movie_clip.py --dataset coin --annotation_file COIN.json --embedding_dir E --out_dir csv
  python segment_dataframe_movie_clip.py --dataset pretrain --embedding_dir E [--embedding_dir E2] --out_csv F
  python segment_dataframe_movie_clip.py --combine a.csv b.csv --out_csv combined.csv

Labelled datasets write ``<out_dir>/<task>/{train,val,test}.csv`` (video_id, embedding_path,
number_of_segments, label, label_name, split), ``task.json`` and ``summary.json`` (per split: annotated
rows, rows written, videos without embeddings). ``--legacy_root R`` reads the original release's
per-segment files instead of a store and writes a ``segment_paths`` column.
"""
import argparse
import csv
import json
import math
import os
import sys

import numpy as np
import pandas as pd
from safetensors import SafetensorError, safe_open

from util.embeddings import EXTENSION, EmbeddingError, embedding_path, read_csv
from util.fileio import atomic_write, atomic_write_text
from util.legacy import legacy_segment_paths, legacy_videos
from util.tasks import (BREAKFAST_CLASSES, LIKE_RATIO_OFFSET, LVU_CLASSIFICATION, LVU_TASKS, VIEW_COUNT_OFFSET,
                        Task, builtin_task, expand_tasks)

SPLITS = ('train', 'val', 'test')
LOCATIONS = ('embedding_path', 'segment_paths')


class AnnotationError(ValueError):
    """Malformed annotation; the message names the file and line."""


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
    p.add_argument('--out_dir', help='CSV root: writes <out_dir>/<task>/{train,val,test}.csv')
    p.add_argument('--out_csv', help='pretrain / --combine output CSV')
    p.add_argument('--tasks', nargs='+', help='lvu: only these task folders ("lvu" = the 9 LVU tasks)')
    p.add_argument('--val_fraction', type=float, default=0.1,
                   help='breakfast/coin: part of each training class held out as val')
    p.add_argument('--seed', type=int, default=0, help='seed of the val hold-out')
    p.add_argument('--combine', nargs='+', metavar='CSV',
                   help='concatenate label-free CSVs into --out_csv, dropping repeated video_ids')
    return p


# ---------------------------------------------------------------- finding embeddings

def count_segments(path):
    """Number of segments in a store file, from its header only."""
    try:
        with safe_open(path, framework='numpy') as f:
            shape = f.get_slice('embeddings').get_shape()
    except (SafetensorError, OSError, ValueError, KeyError) as e:
        raise EmbeddingError(f'{path}: unreadable embedding file ({e})') from None
    if len(shape) != 2 or shape[0] == 0:
        raise EmbeddingError(f'{path}: expected [N, D] embeddings with N >= 1, got shape {shape}')
    return shape[0]


def find_embeddings(video_id, args):
    """``(CSV fields, None)`` for a video with embeddings, else ``(None, reason)``."""
    for d in args.embedding_dir:
        p = embedding_path(d, video_id)
        if os.path.isfile(p):
            try:
                return {'embedding_path': os.path.abspath(p), 'number_of_segments': count_segments(p)}, None
            except EmbeddingError as e:
                return None, str(e)
    for root in args.legacy_root:
        paths = legacy_segment_paths(root, video_id)
        if paths:
            return {'segment_paths': repr([os.path.abspath(p) for p in paths]),
                    'number_of_segments': len(paths)}, None
    return None, 'no embeddings'


def write_csv(path, records, extra_columns=()):
    """Atomic CSV with video_id, the location column(s) used, number_of_segments, then extra_columns."""
    locations = [c for c in LOCATIONS if any(c in r for r in records)] or ['embedding_path']
    df = pd.DataFrame(records, columns=['video_id'] + locations + ['number_of_segments'] + list(extra_columns))
    df[locations] = df[locations].fillna('')
    atomic_write(path, lambda tmp: df.to_csv(tmp, index=False))


# ---------------------------------------------------------------- annotations: (video_id, label, label_name)

def lvu_label(task, fields):
    """``(label, label_name)`` of one LVU line's fields; ValueError if they make no label."""
    if task == 'like_ratio':
        like, dislike = float(fields[0]), float(fields[1])
        if not (like >= 0 and dislike >= 0 and 0 < like + dislike < math.inf):
            raise ValueError(f'like/dislike counts {fields[0]}/{fields[1]} give no ratio')
        return 10 * like / (like + dislike) - LIKE_RATIO_OFFSET, ''
    if task == 'view_count':
        views = float(fields[0])
        if not 0 < views < math.inf:
            raise ValueError(f'view count {fields[0]} must be > 0')
        return math.log(views) - VIEW_COUNT_OFFSET, ''
    label, name = int(fields[0]), ' '.join(fields[1:-2])
    num_classes = LVU_CLASSIFICATION.get(task)
    if label < 0 or (num_classes and label >= num_classes):
        raise ValueError(f'class id {label} outside 0..{num_classes - 1 if num_classes else "(any)"}')
    return label, '' if name == r'\N' else name


def read_lvu_split(path, task):
    """One LVU split file: space-separated, one header line, youtube id = ``line.split()[-2]``.
    Classification lines are ``class_id class_name youtube_id imdb_id`` (the name may hold spaces)."""
    rows = []
    with open(path, encoding='utf-8-sig') as f:
        lines = f.read().splitlines()
    for n, line in enumerate(lines[1:], start=2):
        fields = line.split()
        if not fields:
            continue
        expected = {'like_ratio': 4, 'view_count': 3}.get(task)
        if (len(fields) != expected) if expected else len(fields) < 4:
            raise AnnotationError(f'{path} line {n}: expected {expected or "at least 4"} space-separated fields, '
                                  f'got {len(fields)}: {line!r}')
        try:
            rows.append((fields[-2],) + lvu_label(task, fields))
        except ValueError as e:
            raise AnnotationError(f'{path} line {n}: {e} in {line!r}') from None
    return rows


def class_names(splits, num_classes):
    """Name of each class id: the first non-empty name the annotation files give it ('' if none)."""
    names = [''] * num_classes
    for rows in splits.values():
        for _, label, name in rows:
            if name and not names[label]:
                names[label] = name
    return names


def lvu_tasks(args):
    """``[(Task, {split: rows})]`` for the task folders in --annotation_dir."""
    root = args.annotation_dir
    if not os.path.isdir(root):
        raise AnnotationError(f'{root}: annotation folder not found')
    found = [d for d in sorted(os.listdir(root))
             if any(os.path.isfile(os.path.join(root, d, s + '.csv')) for s in SPLITS)]
    found = [t for t in LVU_TASKS if t in found] + [t for t in found if t not in LVU_TASKS]
    if args.tasks:
        wanted = expand_tasks(args.tasks)
        absent = [t for t in wanted if t not in found]
        if absent:
            raise AnnotationError(f'{root}: no task folder for {", ".join(absent)} (found: {", ".join(found)})')
        found = wanted
    if not found:
        raise AnnotationError(f'{root}: no task folders with train/val/test.csv')
    out = []
    for t in found:
        files = {s: os.path.join(root, t, s + '.csv') for s in SPLITS}
        for f in files.values():
            if not os.path.isfile(f):
                raise AnnotationError(f'{f}: split file not found')
        splits = {s: read_lvu_split(f, t) for s, f in files.items()}
        task = builtin_task(t)
        if task is None:
            labels = [r[1] for rows in splits.values() for r in rows]
            task = Task(t, max(labels) + 1 if labels else 0)
            print(f'note: {t} is not an LVU task; treated as classification with {task.num_classes} '
                  f'classes (largest class id in its files + 1)')
        if not task.regression:
            task.class_names = class_names(splits, task.num_classes)
        out.append((task, splits))
    return out


def read_breakfast_split(path):
    """``file_name,duration,action,class_id`` with a header line."""
    if not os.path.isfile(path):
        raise AnnotationError(f'{path}: split file not found')
    rows = []
    with open(path, newline='', encoding='utf-8-sig') as f:
        reader = csv.reader(f)
        header = [h.strip() for h in next(reader, [])]
        if not {'file_name', 'action', 'class_id'} <= set(header):
            raise AnnotationError(f'{path} line 1: header must have file_name, action and class_id, got {header}')
        col = {h: i for i, h in enumerate(header)}
        for fields in reader:
            where = f'{path} line {reader.line_num}'
            if not fields:
                continue
            if len(fields) != len(header):
                raise AnnotationError(f'{where}: expected {len(header)} comma-separated fields, got {len(fields)}')
            try:
                label = int(fields[col['class_id']])
            except ValueError:
                raise AnnotationError(f'{where}: class_id {fields[col["class_id"]]!r} is not an integer') from None
            if not 0 <= label < len(BREAKFAST_CLASSES):
                raise AnnotationError(f'{where}: class_id {label} outside 0..{len(BREAKFAST_CLASSES) - 1}')
            rows.append((fields[col['file_name']].strip(), label, fields[col['action']].strip()))
    return rows


def read_coin(path):
    """COIN.json -> (training rows, testing rows, class names); label = recipe_type."""
    try:
        with open(path, encoding='utf-8-sig') as f:
            database = json.load(f)['database']
    except FileNotFoundError:
        raise AnnotationError(f'{path}: file not found') from None
    except json.JSONDecodeError as e:
        raise AnnotationError(f'{path} line {e.lineno}: invalid JSON ({e.msg})') from None
    except (KeyError, TypeError):
        raise AnnotationError(f'{path}: no top-level "database" object') from None
    task = builtin_task('coin')
    subsets, names = {'training': [], 'testing': []}, [''] * task.num_classes
    for vid, ann in database.items():
        where = f'{path} entry {vid!r}'
        try:
            label, subset = ann['recipe_type'], ann['subset']
        except (KeyError, TypeError):
            raise AnnotationError(f'{where}: needs "recipe_type" and "subset"') from None
        if not isinstance(label, int) or not 0 <= label < task.num_classes:
            raise AnnotationError(f'{where}: recipe_type {label!r} is not an integer in 0..{task.num_classes - 1}')
        if subset not in subsets:
            raise AnnotationError(f'{where}: subset {subset!r} is not "training" or "testing"')
        name = str(ann.get('class', ''))
        subsets[subset].append((vid, label, name))
        names[label] = names[label] or name
    task.class_names = names
    return task, subsets['training'], subsets['testing']


def hold_out_val(train, fraction, seed):
    """Seeded split of ``train`` stratified by class: ``round(n * fraction)`` of each class's n videos go to
    val, at most n - 1 (a class with a single video stays in train). Made from the annotation alone, so
    it does not change when more embeddings are extracted."""
    rng = np.random.default_rng(seed)
    by_class = {}
    for i, (_, label, _) in enumerate(train):
        by_class.setdefault(label, []).append(i)
    val = set()
    for label in sorted(by_class):
        idx = sorted(by_class[label], key=lambda i: train[i][0])
        k = min(len(idx) - 1, int(len(idx) * fraction + 0.5))
        val.update(idx[j] for j in rng.permutation(len(idx))[:k])
    return ([r for i, r in enumerate(train) if i not in val], [r for i, r in enumerate(train) if i in val])


# ---------------------------------------------------------------- outputs

def write_task(args, task, splits):
    """CSVs of one task, its task.json and summary.json; returns the number of rows without embeddings."""
    folder = os.path.join(args.out_dir, task.name)
    summary, missing_total = {}, 0
    for split in SPLITS:
        records, missing = [], {}
        for vid, label, name in splits[split]:
            fields, problem = find_embeddings(vid, args)
            if fields is None:
                missing[vid] = problem
                continue
            records.append({'video_id': vid, **fields, 'label': label, 'label_name': name, 'split': split})
        write_csv(os.path.join(folder, split + '.csv'), records, ('label', 'label_name', 'split'))
        summary[split] = {'annotated': len(splits[split]), 'written': len(records),
                          'missing': len(splits[split]) - len(records), 'missing_videos': missing}
        missing_total += summary[split]['missing']
        print(f'{task.name}/{split}: {len(records)} of {len(splits[split])} annotated videos have embeddings'
              + (f', {summary[split]["missing"]} missing' if missing else ''))
        if not records:
            print(f'WARNING: {os.path.join(folder, split + ".csv")} has no rows')
    task.save(folder)

    atomic_write_text(os.path.join(folder, 'summary.json'), json.dumps(summary, indent=1))
    return missing_total


def pretrain_csv(args):
    """One label-free row per video found in the stores / legacy roots (first one wins)."""
    vids = []
    for d in args.embedding_dir:
        vids += sorted(f[:-len(EXTENSION)] for f in os.listdir(d) if f.endswith(EXTENSION))
    for root in args.legacy_root:
        vids += list(legacy_videos(root))
    records, bad, seen = [], {}, set()
    for vid in vids:
        if vid in seen:
            continue
        seen.add(vid)
        fields, problem = find_embeddings(vid, args)
        if fields is None:
            bad[vid] = problem
            print(f'skipped {vid}: {problem}')
        else:
            records.append({'video_id': vid, **fields})
    write_csv(args.out_csv, records)
    print(f'{args.out_csv}: {len(records)} videos ({len(vids) - len(seen)} repeated ids, {len(bad)} unreadable '
          f'files skipped)')
    return records, bad


def combine(csv_paths, out_csv):
    """Concatenate label-free CSVs (paths made absolute); a repeated video_id keeps its first row."""
    records, seen, repeated = [], set(), 0
    for c in csv_paths:
        rows = read_csv(c)
        counts = pd.read_csv(c, dtype={'video_id': str}, keep_default_na=False).get('number_of_segments')
        if counts is None:
            raise EmbeddingError(f'{c}: needs a "number_of_segments" column')
        for r, n in zip(rows, counts):
            if r['video_id'] in seen:
                repeated += 1
                continue
            seen.add(r['video_id'])
            try:
                n = int(n)
            except ValueError:
                raise EmbeddingError(f'{c} row {r["row"]}: number_of_segments {n!r} is not an integer') from None
            src = r['source']
            location = ('segment_paths', repr([os.path.normpath(p) for p in src])) if isinstance(src, list) \
                else ('embedding_path', os.path.normpath(src))
            records.append({'video_id': r['video_id'], location[0]: location[1], 'number_of_segments': n})
    write_csv(out_csv, records)
    print(f'{out_csv}: {len(records)} videos from {len(csv_paths)} CSVs, {repeated} repeated video ids removed')
    return repeated


def main(args):
    if args.combine:
        return combine(args.combine, args.out_csv)
    for d in args.embedding_dir + args.legacy_root:
        if not os.path.isdir(d):
            raise EmbeddingError(f'{d}: embedding folder not found')
    if args.dataset == 'pretrain':
        return pretrain_csv(args)
    if args.dataset == 'lvu':
        tasks = lvu_tasks(args)
    else:
        if args.dataset == 'breakfast':
            task = builtin_task('breakfast')
            paths = (os.path.join(args.annotation_dir, f'{s}.csv') for s in ('train', 'test'))
            train, test = map(read_breakfast_split, paths)
        else:
            task, train, test = read_coin(args.annotation_file)
        train, val = hold_out_val(train, args.val_fraction, args.seed)
        tasks = [(task, {'train': train, 'val': val, 'test': test})]
    missing = sum(write_task(args, task, splits) for task, splits in tasks)
    if missing:
        print(f'{missing} annotated videos have no embeddings: listed per split in '
              f'{os.path.join(args.out_dir, "<task>", "summary.json")}')
    return missing


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
    for flag in (need, 'out_dir') if args.dataset != 'pretrain' else (need,):
        if not getattr(args, flag):
            parser.error(f'--dataset {args.dataset} needs --{flag}')
    if not 0 <= args.val_fraction < 1:
        parser.error('--val_fraction must be in [0, 1)')


if __name__ == '__main__':
    parser = get_args_parser()
    args = parser.parse_args()
    check_args(parser, args)
    try:
        main(args)
    except (AnnotationError, EmbeddingError) as e:
        sys.exit(f'error: {e}')
