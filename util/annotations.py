"""Benchmark annotations for step 4: the LVU, Breakfast and COIN readers, the checks that keep a video in
one split with one label, and the validation hold-out of the benchmarks that have no val split.

Every reader returns rows ``Row(video_id, label, label_name, where)``; ``where`` names the file and line
(or JSON entry) the row came from, for error messages. Bad annotations raise ``AnnotationError`` naming
the file and line.
"""
import csv
import io
import json
import math
import os
import re
from typing import NamedTuple

import numpy as np

from util.errors import InputError
from util.tasks import (BREAKFAST_CLASSES, LIKE_RATIO_OFFSET, LVU_CLASSIFICATION, LVU_TASKS, SPLITS,
                        VIEW_COUNT_OFFSET, Task, builtin_task, expand_tasks)


class AnnotationError(InputError, ValueError):
    """Malformed annotation; the message names the file and line."""


class Row(NamedTuple):
    video_id: str
    label: object       # int class id, or float regression target
    label_name: str
    where: str = ''     # '<file> line <n>' (or '<file> entry <id>')


def read_text(path):
    """Text of an annotation file: UTF-8, with or without a byte-order mark; another encoding (Latin-1,
    UTF-16) is an ``AnnotationError`` naming the file and the line of the first byte that is not UTF-8."""
    with open(path, 'rb') as f:
        data = f.read()
    try:
        return data.decode('utf-8-sig')
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b'\n') + 1
        raise AnnotationError(f'{path} line {line}: not UTF-8 text (byte {e.start}: {e.reason}); '
                              f'save the file as UTF-8') from None


# ---------------------------------------------------------------- LVU

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
    Classification lines are ``class_id class_name youtube_id imdb_id`` (the name may hold spaces). A
    first line that is a data row (its last field an IMDb id, ``tt<digits>``: a file saved without its
    header) is read as one, not dropped as the header."""
    rows = []
    lines = read_text(path).splitlines()
    expected = {'like_ratio': 4, 'view_count': 3}.get(task)
    first = 0 if lines and re.fullmatch(r'tt\d+', (lines[0].split() or [''])[-1]) else 1
    for n, line in enumerate(lines[first:], start=first + 1):
        fields = line.split()
        if not fields:
            continue
        if (len(fields) != expected) if expected else len(fields) < 4:
            raise AnnotationError(f'{path} line {n}: expected {expected or "at least 4"} space-separated fields, '
                                  f'got {len(fields)}: {line!r}')
        try:
            rows.append(Row(fields[-2], *lvu_label(task, fields), f'{path} line {n}'))
        except ValueError as e:
            raise AnnotationError(f'{path} line {n}: {e} in {line!r}') from None
    return rows


def class_names(splits, num_classes):
    """Name of each class id: the first non-empty name the annotation files give it ('' if none)."""
    names = [''] * num_classes
    for rows in splits.values():
        for r in rows:
            if r.label_name and not names[r.label]:
                names[r.label] = r.label_name
    return names


def lvu_tasks(root, tasks=None, log=print):
    """``[(Task, {split: rows})]`` for the task folders in an ``lvu_1.0`` folder (``tasks``: only these;
    ``'lvu'`` stands for the 9 LVU tasks). A folder that is not an LVU task is read as classification."""
    if not os.path.isdir(root):
        raise AnnotationError(f'{root}: annotation folder not found')
    found = [d for d in sorted(os.listdir(root))
             if any(os.path.isfile(os.path.join(root, d, s + '.csv')) for s in SPLITS)]
    found = [t for t in LVU_TASKS if t in found] + [t for t in found if t not in LVU_TASKS]
    if tasks:
        wanted = expand_tasks(tasks)
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
            labels = [r.label for rows in splits.values() for r in rows]
            task = Task(t, max(labels) + 1 if labels else 0)
            log(f'note: {t} is not an LVU task; treated as classification with {task.num_classes} '
                f'classes (largest class id in its files + 1)')
        if not task.regression:
            task.class_names = class_names(splits, task.num_classes)
        out.append((task, splits))
    return out


# ---------------------------------------------------------------- Breakfast and COIN

def read_breakfast_split(path):
    """``file_name,duration,action,class_id`` with a header line; a row of empty fields (a spreadsheet's
    blank row) is skipped as a blank line is."""
    if not os.path.isfile(path):
        raise AnnotationError(f'{path}: split file not found')
    rows = []
    with io.StringIO(read_text(path), newline='') as f:
        reader = csv.reader(f)
        header = [h.strip() for h in next(reader, [])]
        if not {'file_name', 'action', 'class_id'} <= set(header):
            raise AnnotationError(f'{path} line 1: header must have file_name, action and class_id, got {header}')
        col = {h: i for i, h in enumerate(header)}
        for fields in reader:
            where = f'{path} line {reader.line_num}'
            if not ''.join(fields).strip():
                continue
            if len(fields) != len(header):
                raise AnnotationError(f'{where}: expected {len(header)} comma-separated fields, got {len(fields)}')
            try:
                label = int(fields[col['class_id']])
            except ValueError:
                raise AnnotationError(f'{where}: class_id {fields[col["class_id"]]!r} is not an integer') from None
            if not 0 <= label < len(BREAKFAST_CLASSES):
                raise AnnotationError(f'{where}: class_id {label} outside 0..{len(BREAKFAST_CLASSES) - 1}')
            rows.append(Row(fields[col['file_name']].strip(), label, fields[col['action']].strip(), where))
    return rows


def breakfast_task(annotation_dir):
    """``(Task, train rows, test rows)`` from a folder holding Breakfast's ``train.csv`` and ``test.csv``.
    Each action must have one class id, and each class id one action, over both files (two files that
    number the classes differently would give wrong labels without any error); the class names are the files'."""
    train, test = (read_breakfast_split(os.path.join(annotation_dir, f'{s}.csv')) for s in ('train', 'test'))
    first = {}
    for r in train + test:
        for key in (('class_id', r.label), ('action', r.label_name)):
            r0 = first.setdefault(key, r)
            if (r0.label, r0.label_name) != (r.label, r.label_name):
                raise AnnotationError(f'{r.where}: action {r.label_name!r} has class_id {r.label}, but {r0.where} '
                                      f'gives {r0.label_name!r} class_id {r0.label}; each action needs one class id '
                                      f'in both files')
    task = builtin_task('breakfast')
    task.class_names = [n or b for n, b in zip(class_names({'train': train, 'test': test}, task.num_classes),
                                               BREAKFAST_CLASSES)]
    return task, train, test


def read_coin(path):
    """COIN.json -> ``(Task, training rows, testing rows)``; label = recipe_type (an integer, or one written
    as a string: ``"12"``)."""
    try:
        database = json.loads(read_text(path))['database']
    except FileNotFoundError:
        raise AnnotationError(f'{path}: file not found') from None
    except json.JSONDecodeError as e:
        raise AnnotationError(f'{path} line {e.lineno}: invalid JSON ({e.msg})') from None
    except (KeyError, TypeError):
        raise AnnotationError(f'{path}: no top-level "database" object') from None
    if not isinstance(database, dict):
        raise AnnotationError(f'{path}: "database" must map each video id to its entry, '
                              f'got a {type(database).__name__}')
    task = builtin_task('coin')
    subsets, names = {'training': [], 'testing': []}, [''] * task.num_classes
    for vid, ann in database.items():
        where = f'{path} entry {vid!r}'
        try:
            label, subset = ann['recipe_type'], ann['subset']
        except (KeyError, TypeError):
            raise AnnotationError(f'{where}: needs "recipe_type" and "subset"') from None
        if isinstance(label, str) and label.strip().isdigit():
            label = int(label)
        if type(label) is not int or not 0 <= label < task.num_classes:
            raise AnnotationError(f'{where}: recipe_type {label!r} is not an integer in 0..{task.num_classes - 1}')
        if subset not in subsets:
            raise AnnotationError(f'{where}: subset {subset!r} is not "training" or "testing"')
        name = str(ann.get('class', ''))
        subsets[subset].append(Row(vid, label, name, where))
        names[label] = names[label] or name
    task.class_names = names
    return task, subsets['training'], subsets['testing']


# ---------------------------------------------------------------- one split and one label per video

def check_splits(task_name, splits, log=print):
    """Stop on leakage: a video listed in two splits, or twice with two labels, raises ``AnnotationError``
    naming both places. A video listed twice in one split with the same label is kept once; returns
    ``{split: rows}`` without those repeats and ``{split: number of repeats dropped}``."""
    first = {}  # video_id -> (split, row)
    out, repeats = {}, {}
    for split, rows in splits.items():
        out[split], repeats[split] = [], 0
        for r in rows:
            if r.video_id not in first:
                first[r.video_id] = (split, r)
                out[split].append(r)
                continue
            split0, r0 = first[r.video_id]
            if split0 != split:
                raise AnnotationError(f'{task_name}: video {r.video_id} is in {split0} ({r0.where}) and in {split} '
                                      f'({r.where}); a video in two splits leaks evaluation data into training')
            if r0.label != r.label:
                raise AnnotationError(f'{task_name}: video {r.video_id} has label {r0.label!r} ({r0.where}) and '
                                      f'label {r.label!r} ({r.where}); give each video one label')
            repeats[split] += 1
        if repeats[split]:
            log(f'note: {task_name}/{split}: {repeats[split]} repeated rows (same video, same label) kept once')
    return out, repeats


# ---------------------------------------------------------------- validation hold-out

def hold_out_val(train, fraction, seed):
    """Seeded split of ``train`` stratified by class: ``round(n * fraction)`` of each class's n videos go to
    val, at most n - 1 (a class with a single video stays in train). Made from the annotation alone, so
    it does not change when more embeddings are extracted. Rows are ``(video_id, label, ...)``."""
    rng = np.random.default_rng(seed)
    by_class = {}
    for i, r in enumerate(train):
        by_class.setdefault(r[1], []).append(i)
    val = set()
    for label in sorted(by_class):
        idx = sorted(by_class[label], key=lambda i: train[i][0])
        k = min(len(idx) - 1, int(len(idx) * fraction + 0.5))
        val.update(idx[j] for j in rng.permutation(len(idx))[:k])
    return ([r for i, r in enumerate(train) if i not in val], [r for i, r in enumerate(train) if i in val])
