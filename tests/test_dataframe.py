"""Step 4 (segment_dataframe_movie_clip.py) and tools/convert_legacy_embeddings.py on small annotation
files in the real LVU / Breakfast / COIN formats and a store of random unit vectors."""
import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch

import segment_dataframe_movie_clip as sdf
from util.embeddings import EmbeddingError, load_row, load_video_embeddings, read_csv, save_video_embeddings
from util.annotations import read_lvu_split
from util.tasks import LIKE_RATIO_OFFSET, VIEW_COUNT_OFFSET, get_task

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
spec = importlib.util.spec_from_file_location('convert_legacy',
                                              os.path.join(ROOT, 'tools', 'convert_legacy_embeddings.py'))
convert_legacy = importlib.util.module_from_spec(spec)
spec.loader.exec_module(convert_legacy)

D = 8


def make_store(folder, video_ids, seed=0):
    """Random unit vectors, 2..6 segments per video; returns {video_id: number_of_segments}."""
    g = torch.Generator().manual_seed(seed)
    sizes = {}
    for vid in video_ids:
        n = int(torch.randint(2, 7, (1,), generator=g))
        emb = torch.nn.functional.normalize(torch.randn(n, D, generator=g), dim=-1)
        save_video_embeddings(os.path.join(folder, vid + '.safetensors'), emb, np.arange(n) * 5.0,
                              np.arange(1, n + 1) * 5.0, {'video_id': vid}, dtype=np.float32)
        sizes[vid] = n
    return sizes


def write(path, text):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, 'w') as f:
        f.write(text)


def args(*argv):
    return sdf.get_args_parser().parse_args([str(a) for a in argv])


def read(path):
    return pd.read_csv(path, dtype={'video_id': str, 'label_name': str}, keep_default_na=False)


# relationship: test lacks class 1; one '\N' name; 'r_gone' has no embedding
RELATIONSHIP = {
    'train': [(0, 'friend', 'r_a'), (1, 'wife', 'r_b'), (2, 'husband', 'r_c'), (3, r'\N', 'r_d'),
              (0, 'friend', 'r_gone')],
    'val': [(1, 'wife', 'r_e'), (3, 'boyfriend', 'r_f')],
    'test': [(0, 'friend', 'r_g'), (2, 'husband', 'r_h'), (3, 'boyfriend', 'r_i')],
}
LIKES = {'train': [(90, 10, 'l_a'), (3, 0, 'l_b'), (0, 7, 'l_c')], 'val': [(55, 45, 'l_d')], 'test': [(1, 1, 'l_e')]}
VIEWS = {'train': [(12345, 'v_a'), (1, 'v_b')], 'val': [(987654, 'v_c')], 'test': [(42, 'v_d'), (7, 'v_gone')]}
# a user's task folder, not one of the LVU tasks: class 5 only in test
CUSTOM = {'train': [(0, 'a', 'c_a'), (2, 'c', 'c_b')], 'val': [(1, 'b', 'c_c')], 'test': [(5, 'f', 'c_d')]}


@pytest.fixture
def lvu(tmp_path):
    ann = tmp_path / 'lvu_1.0'
    for s in sdf.SPLITS:
        write(ann / 'relationship' / f'{s}.csv', 'class_id class_name youtube_id imdb_id\n' + ''.join(
            f'{c} {n} {v} tt{i:07d}\n' for i, (c, n, v) in enumerate(RELATIONSHIP[s])))
        write(ann / 'like_ratio' / f'{s}.csv', 'like dislike youtube_id imdb_id\n' + ''.join(
            f'{lk} {dl} {v} tt1\n' for lk, dl, v in LIKES[s]))
        write(ann / 'view_count' / f'{s}.csv', 'view_count youtube_id imdb_id\n' + ''.join(
            f'{n} {v} tt1\n' for n, v in VIEWS[s]))
        write(ann / 'mytask' / f'{s}.csv', 'class_id class_name youtube_id imdb_id\n' + ''.join(
            f'{c} {n} {v} tt1\n' for c, n, v in CUSTOM[s]))
    ids = [v for d in (RELATIONSHIP, LIKES, CUSTOM) for rows in d.values() for *_, v in rows]
    ids += [v for rows in VIEWS.values() for _, v in rows]
    sizes = make_store(tmp_path / 'store', [v for v in ids if not v.endswith('_gone')])
    return ann, tmp_path / 'store', sizes, tmp_path / 'csv'


def test_lvu_labels_targets_and_missing_report(lvu):
    ann, store, sizes, out = lvu
    missing = sdf.main(args('--dataset', 'lvu', '--annotation_dir', ann, '--embedding_dir', store, '--out_dir', out))
    assert missing == 2

    for s in sdf.SPLITS:  # class ids kept as given (test has no class 1), '\N' -> empty name
        df = read(out / 'relationship' / f'{s}.csv')
        expect = [(c, '' if n == r'\N' else n, v) for c, n, v in RELATIONSHIP[s] if v != 'r_gone']
        assert list(zip(df.label, df.label_name, df.video_id)) == expect
        assert (df.split == s).all()
        assert list(df.number_of_segments) == [sizes[v] for v in df.video_id]
        assert all(os.path.isabs(p) for p in df.embedding_path)
    task = get_task('relationship', out)
    assert task.num_classes == 4 and not task.regression
    assert task.class_names == ['friend', 'wife', 'husband', 'boyfriend']

    for s in sdf.SPLITS:
        df = read(out / 'like_ratio' / f'{s}.csv')
        assert df.label.tolist() == pytest.approx([10 * lk / (lk + dl) - LIKE_RATIO_OFFSET for lk, dl, _ in LIKES[s]],
                                                  rel=0, abs=1e-12)
        assert (df.label_name == '').all()
    df = read(out / 'view_count' / 'test.csv')
    assert df.video_id.tolist() == ['v_d']
    assert df.label.tolist() == pytest.approx([math.log(42) - VIEW_COUNT_OFFSET], rel=0, abs=1e-12)
    assert get_task('view_count', out).regression

    # unknown task folder: classification, classes = max id over all splits + 1
    task = get_task('mytask', out)
    assert task.num_classes == 6 and task.class_names == ['a', 'b', 'c', '', '', 'f']

    summary = json.load(open(out / 'relationship' / 'summary.json'))
    assert summary['train'] == {'annotated': 5, 'written': 4, 'missing': 1,
                                'missing_videos': {'r_gone': 'no embeddings'}}
    assert summary['test']['missing'] == 0
    assert json.load(open(out / 'view_count' / 'summary.json'))['test']['missing_videos'] == {'v_gone': 'no embeddings'}

    rows = read_csv(out / 'relationship' / 'train.csv', label_required=True)
    emb = load_row(rows[0], input_size=D)
    assert torch.equal(emb, load_video_embeddings(store / 'r_a.safetensors'))

    out2 = ann.parent / 'only'  # --tasks restricts
    sdf.main(args('--dataset', 'lvu', '--annotation_dir', ann, '--embedding_dir', store, '--out_dir', out2,
                  '--tasks', 'view_count'))
    assert os.listdir(out2) == ['view_count']


@pytest.mark.parametrize('task,line,problem', [
    ('relationship', '1 wife r_x', 'fields'),
    ('relationship', 'one wife r_x tt1', 'int'),
    ('relationship', '4 wife r_x tt1', 'class id 4'),
    ('like_ratio', '0 0 l_x tt1', 'no ratio'),
    ('like_ratio', '5 many l_x tt1', 'float'),
    ('like_ratio', '5 l_x tt1', 'fields'),
    ('view_count', '0 v_x tt1', 'must be > 0'),
])
def test_lvu_malformed_line_names_file_and_line(lvu, task, line, problem):
    ann, store, _, out = lvu
    path = ann / task / 'val.csv'
    with open(path, 'a') as f:
        f.write(line + '\n')
    n = len(open(path).read().splitlines())
    with pytest.raises(sdf.AnnotationError, match=problem) as e:
        sdf.main(args('--dataset', 'lvu', '--annotation_dir', ann, '--embedding_dir', store, '--out_dir', out))
    assert f'{path} line {n}:' in str(e.value)


def test_lvu_file_without_its_header_keeps_its_first_row(tmp_path):
    """A split file saved without its header line: the first row (last field an IMDb id) is data, not
    dropped as the header; with the header, the header alone is skipped."""
    rows = '0 friend abc tt0088128\n1 wife def tt0000002\n'
    write(tmp_path / 'a.csv', rows)
    write(tmp_path / 'b.csv', 'class_id class_name youtube_id imdb_id\n' + rows)
    for name in ('a.csv', 'b.csv'):
        got = read_lvu_split(str(tmp_path / name), 'relationship')
        assert [(r.video_id, r.label) for r in got] == [('abc', 0), ('def', 1)]
    assert got[0].where.endswith('b.csv line 2')


def test_cli_reports_error_without_traceback(lvu):
    ann, store, _, out = lvu
    with open(ann / 'view_count' / 'test.csv', 'a') as f:
        f.write('-3 v_x tt1\n')
    r = subprocess.run([sys.executable, os.path.join(ROOT, 'segment_dataframe_movie_clip.py'), '--dataset', 'lvu',
                        '--annotation_dir', ann, '--embedding_dir', store, '--out_dir', out],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2   # util.errors.run_main: bad input exits 2
    path = ann / 'view_count' / 'test.csv'
    assert r.stderr.strip() == f"error: {path} line 4: view count -3 must be > 0 in '-3 v_x tt1'"



@pytest.mark.parametrize('dataset,name,text,encoding,line', [
    ('lvu', 'relationship/val.csv', 'class_id class_name youtube_id imdb_id\n1 Almodóvar r_e tt1\n', 'latin-1', 2),
    ('breakfast', 'test.csv', 'file_name,duration,action,class_id\nP03_tea,5,tea,2\n', 'utf-16', 1),
    ('coin', 'COIN.json', '{"database": {"y1": {"recipe_type": 1, "subset": "training", "class": "Café"}}}',
     'latin-1', 1),
], ids=['lvu', 'breakfast', 'coin'])
def test_annotation_not_in_utf8_names_file_and_line(lvu, dataset, name, text, encoding, line):
    ann, store, _, out = lvu
    folder = {'lvu': ann, 'breakfast': ann.parent / 'bf', 'coin': ann.parent}[dataset]
    write(folder / 'train.csv', 'file_name,duration,action,class_id\nP04_tea,5,tea,2\n')
    with open(folder / name, 'wb') as f:
        f.write(text.encode(encoding))
    source = ['--annotation_file', folder / name] if dataset == 'coin' else ['--annotation_dir', folder]
    with pytest.raises(sdf.AnnotationError) as e:
        sdf.main(args('--dataset', dataset, *source, '--embedding_dir', store, '--out_dir', out))
    assert str(e.value).startswith(f'{folder / name} line {line}: not UTF-8 text')

def test_hold_out_val_stratified_seeded():
    train = [(f'a{i}', 0, 'x') for i in range(20)] + [(f'b{i}', 1, 'y') for i in range(7)] + [('c0', 2, 'z')]
    tr, val = sdf.hold_out_val(train, 0.2, seed=3)
    assert sorted(tr + val) == sorted(train) and not set(tr) & set(val)
    assert [sum(r[1] == c for r in val) for c in range(3)] == [4, 1, 0]  # round(n * 0.2), single video kept
    assert {r[1] for r in tr} == {0, 1, 2}
    assert sdf.hold_out_val(train[::-1], 0.2, seed=3)[1] == [r for r in train[::-1] if r in val]  # order-free
    assert {r[0] for r in sdf.hold_out_val(train, 0.2, seed=4)[1]} != {r[0] for r in val}
    assert sdf.hold_out_val(train, 0.0, seed=3) == (train, [])


def test_breakfast(tmp_path):
    names = ['cereals', 'coffee', 'tea']
    train = [(f'P{p:02d}-cam01-P{p:02d}_{names[c]}', c) for p in range(3, 23) for c in (0, 1)]
    train.append(('P03-cam01-P03_tea', 2))
    test = [(f'P{p:02d}-webcam01-P{p:02d}_{names[c]}', c) for p in range(40, 44) for c in (0, 2)]
    for split, rows in (('train', train), ('test', test)):  # train saved with a byte-order mark, as Excel does
        bom = '\ufeff' * (split == 'train')
        write(tmp_path / 'ann' / f'{split}.csv', bom + 'file_name,duration,action,class_id\n' + ''.join(
            f'{v},56,{names[c]},{c}\n' for v, c in rows))
    make_store(tmp_path / 'store', [v for v, _ in train + test][1:])  # first training video has no embedding
    common = ['--dataset', 'breakfast', '--annotation_dir', tmp_path / 'ann', '--embedding_dir', tmp_path / 'store',
              '--val_fraction', 0.25]
    assert sdf.main(args(*common, '--out_dir', tmp_path / 'a')) == 1
    sdf.main(args(*common, '--out_dir', tmp_path / 'b'))
    sdf.main(args(*common, '--out_dir', tmp_path / 'c', '--seed', 1))
    df = {s: read(tmp_path / 'a' / 'breakfast' / f'{s}.csv') for s in sdf.SPLITS}
    for s in sdf.SPLITS:  # deterministic
        assert df[s].equals(read(tmp_path / 'b' / 'breakfast' / f'{s}.csv'))
    assert not df['val'].equals(read(tmp_path / 'c' / 'breakfast' / 'val.csv'))
    assert not set(df['train'].video_id) & set(df['val'].video_id)
    assert sorted(df['val'].label) == [0] * 5 + [1] * 5  # 25% of 20 per class; the single tea video stays in train
    assert set(df['train'].label) == {0, 1, 2}
    assert sorted(set(df['train'].video_id) | set(df['val'].video_id) | {train[0][0]}) == sorted(v for v, _ in train)
    assert list(zip(df['test'].video_id, df['test'].label, df['test'].label_name)) == \
        [(v, c, names[c]) for v, c in test]
    assert get_task('breakfast', tmp_path / 'a').num_classes == 10

    with open(tmp_path / 'ann' / 'test.csv', 'a') as f:
        f.write('P50-cam01-P50_milk,30,milk\nignored\n')
    with pytest.raises(sdf.AnnotationError, match=f'{tmp_path / "ann" / "test.csv"} line 10: expected 4'):
        sdf.main(args(*common, '--out_dir', tmp_path / 'd'))



def test_breakfast_spreadsheet_blank_rows_are_skipped(tmp_path):
    names = ['cereals', 'coffee']
    rows = [(f'P{p:02d}_{names[c]}', c) for p in range(3, 9) for c in (0, 1)]
    for split, part, tail in (('train', rows[:8], ',,,\r\n'), ('test', rows[8:], '  \r\n,, ,\r\n\r\n')):
        write(tmp_path / 'ann' / f'{split}.csv', 'file_name,duration,action,class_id\r\n' + ''.join(
            f'{v},56.5,{names[c]},{c}\r\n' for v, c in part) + tail)
    make_store(tmp_path / 'store', [v for v, _ in rows])
    assert sdf.main(args('--dataset', 'breakfast', '--annotation_dir', tmp_path / 'ann', '--embedding_dir',
                         tmp_path / 'store', '--val_fraction', 0, '--out_dir', tmp_path / 'out')) == 0
    assert read(tmp_path / 'out' / 'breakfast' / 'test.csv').video_id.tolist() == [v for v, _ in rows[8:]]
    assert len(read(tmp_path / 'out' / 'breakfast' / 'train.csv')) == 8


def test_breakfast_class_ids_must_mean_one_action_in_both_files(tmp_path):
    names = ['cereals', 'coffee', 'tea']   # test.csv numbered alphabetically, as another copy of the split may be
    write(tmp_path / 'ann' / 'train.csv', 'file_name,duration,action,class_id\n' + ''.join(
        f'P{p:02d}_{names[c]},5,{names[c]},{c}\n' for p in range(3, 9) for c in (0, 1, 2)))
    write(tmp_path / 'ann' / 'test.csv', 'file_name,duration,action,class_id\nP40_coffee,5,coffee,1\nP40_tea,5,tea,9\n')
    make_store(tmp_path / 'store', ['P40_coffee', 'P40_tea'])
    common = ['--dataset', 'breakfast', '--annotation_dir', tmp_path / 'ann', '--embedding_dir', tmp_path / 'store']
    with pytest.raises(sdf.AnnotationError) as e:
        sdf.main(args(*common, '--out_dir', tmp_path / 'out'))
    assert str(e.value) == (f"{tmp_path / 'ann' / 'test.csv'} line 3: action 'tea' has class_id 9, but "
                            f"{tmp_path / 'ann' / 'train.csv'} line 4 gives 'tea' class_id 2; each action needs one "
                            f"class id in both files")
    write(tmp_path / 'ann' / 'test.csv', 'file_name,duration,action,class_id\nP40_coffee,5,salad,1\n')
    with pytest.raises(sdf.AnnotationError, match=r"test.csv line 2: action 'salad' has class_id 1, but .*train.csv "
                                                  r"line 3 gives 'coffee' class_id 1"):
        sdf.main(args(*common, '--out_dir', tmp_path / 'out'))
    assert not os.path.exists(tmp_path / 'out')
    write(tmp_path / 'ann' / 'test.csv', 'file_name,duration,action,class_id\nP40_coffee,5,coffee,1\n')
    sdf.main(args(*common, '--out_dir', tmp_path / 'out'))
    assert get_task('breakfast', tmp_path / 'out').class_names == ['cereals', 'coffee', 'tea', 'pancake', 'friedegg',
                                                                   'scrambledegg', 'sandwich', 'juice', 'milk', 'salat']

def test_coin(tmp_path):
    db = {f'y{i:03d}': {'recipe_type': i % 3 * 60, 'class': f'task{i % 3 * 60}', 'duration': 100.0,
                        'subset': 'testing' if i % 5 == 0 else 'training', 'annotation': []} for i in range(30)}
    write(tmp_path / 'COIN.json', json.dumps({'database': db}))
    make_store(tmp_path / 'store', list(db))
    common = ['--dataset', 'coin', '--annotation_file', tmp_path / 'COIN.json', '--embedding_dir', tmp_path / 'store']
    assert sdf.main(args(*common, '--out_dir', tmp_path / 'out')) == 0
    test = read(tmp_path / 'out' / 'coin' / 'test.csv')
    assert sorted(zip(test.video_id, test.label)) == \
        [(v, a['recipe_type']) for v, a in db.items() if a['subset'] == 'testing']
    val, train = (read(tmp_path / 'out' / 'coin' / f'{s}.csv') for s in ('val', 'train'))
    assert len(val) == 3 and sorted(val.label) == [0, 60, 120]  # 8 training videos per class, 10% -> 1 each
    assert len(train) + len(val) == 24 and not set(train.video_id) & set(val.video_id)
    task = get_task('coin', tmp_path / 'out')
    assert task.num_classes == 180 and task.class_names[60] == 'task60' and task.class_names[1] == ''

    db['y001']['recipe_type'] = '60'   # a number written as a string is that number
    write(tmp_path / 'COIN.json', json.dumps({'database': db}))
    sdf.main(args(*common, '--out_dir', tmp_path / 'out3'))
    assert read(tmp_path / 'out3' / 'coin' / 'train.csv').equals(read(tmp_path / 'out' / 'coin' / 'train.csv'))

    for value in (180, True, 1.5, 'sixty'):
        db['y001']['recipe_type'] = value
        write(tmp_path / 'COIN.json', json.dumps({'database': db}))
        with pytest.raises(sdf.AnnotationError, match=rf"COIN.json entry 'y001': recipe_type {value!r} is not"):
            sdf.main(args(*common, '--out_dir', tmp_path / 'out2'))
    write(tmp_path / 'COIN.json', json.dumps({'database': list(db)}))
    with pytest.raises(sdf.AnnotationError, match='"database" must map each video id to its entry, got a list'):
        sdf.main(args(*common, '--out_dir', tmp_path / 'out2'))


def test_pretrain_and_combine(tmp_path):
    a = make_store(tmp_path / 'A', ['v1', 'v2', 'v3'], seed=1)
    b = make_store(tmp_path / 'B', ['v3', 'v4'], seed=2)
    write(tmp_path / 'B' / 'v5.safetensors', 'not a safetensors file')
    records, bad = sdf.main(args('--dataset', 'pretrain', '--embedding_dir', tmp_path / 'A', '--embedding_dir',
                                 tmp_path / 'B', '--out_csv', tmp_path / 'pre.csv'))
    df = read(tmp_path / 'pre.csv')
    assert list(df.columns) == ['video_id', 'embedding_path', 'number_of_segments']
    assert list(zip(df.video_id, df.number_of_segments)) == [('v1', a['v1']), ('v2', a['v2']), ('v3', a['v3']),
                                                             ('v4', b['v4'])]
    assert df.embedding_path[2] == str(tmp_path / 'A' / 'v3.safetensors')
    assert list(bad) == ['v5'] and 'v5.safetensors' in bad['v5']

    # a second CSV in another folder with relative paths: combine makes them absolute and drops repeats
    write(tmp_path / 'other' / 'x.csv', 'video_id,embedding_path,number_of_segments\n'
                                        'v2,../B/v4.safetensors,9\nv9,../B/v4.safetensors,' f'{b["v4"]}\n')
    assert sdf.main(args('--combine', tmp_path / 'pre.csv', tmp_path / 'other' / 'x.csv',
                         '--out_csv', tmp_path / 'comb' / 'all.csv')) == 1
    comb = read(tmp_path / 'comb' / 'all.csv')
    assert comb.video_id.tolist() == ['v1', 'v2', 'v3', 'v4', 'v9']
    assert comb.number_of_segments[1] == a['v2']  # first kept
    rows = read_csv(tmp_path / 'comb' / 'all.csv')
    assert rows[4]['source'] == str(tmp_path / 'B' / 'v4.safetensors')
    assert load_row(rows[4]).shape == (b['v4'], D)


def make_legacy(root, videos, seed=0):
    """Original release layout; returns {video_id: [N, D] embeddings in time order}."""
    g = torch.Generator().manual_seed(seed)
    data = {}
    for vid, n in videos.items():
        data[vid] = torch.nn.functional.normalize(torch.randn(n, D, generator=g), dim=-1) * 100  # stored scaled
        for k in reversed(range(n)):  # folder order must not matter ('10-15' sorts before '5-10' as text)
            p = os.path.join(root, vid, f'{5 * k}-{5 * k + 5}', 'langbind_output.pt')
            os.makedirs(os.path.dirname(p))
            torch.save({'embedding': data[vid][k].clone(), 'start': 5 * k, 'end': 5 * k + 5}, p)
    return data


def test_legacy_csv_and_converter(tmp_path, lvu):
    ann, _, _, out = lvu
    videos = {v: 2 + i % 3 for i, (*_, v) in enumerate(r for rows in RELATIONSHIP.values() for r in rows)}
    del videos['r_gone'], videos['r_h']
    videos['r_a'] = 3  # segments 0-5, 5-10, 10-15
    legacy = make_legacy(tmp_path / 'legacy', videos)
    sdf.main(args('--dataset', 'lvu', '--annotation_dir', ann, '--legacy_root', tmp_path / 'legacy',
                  '--out_dir', out, '--tasks', 'relationship'))
    df = read(out / 'relationship' / 'test.csv')
    assert 'embedding_path' not in df.columns and df.video_id.tolist() == ['r_g', 'r_i']
    rows = read_csv(out / 'relationship' / 'train.csv', label_required=True)
    assert rows[0]['source'][1].endswith(os.path.join('r_a', '5-10', 'langbind_output.pt'))
    for r in rows:
        torch.testing.assert_close(load_row(r, input_size=D), legacy[r['video_id']] / 100)
    assert json.load(open(out / 'relationship' / 'summary.json'))['test']['missing_videos'] == {'r_h': 'no embeddings'}

    # converter: store equals the legacy data; a rerun skips; a bad segment file is reported
    os.remove(tmp_path / 'legacy' / 'r_b' / '0-5' / 'langbind_output.pt')
    write(str(tmp_path / 'legacy' / 'r_b' / '0-5' / 'langbind_output.pt'), 'garbage')
    conv = ['--legacy_root', str(tmp_path / 'legacy'), '--embedding_dir', str(tmp_path / 'E'), '--dtype', 'fp32']
    bad = convert_legacy.main(convert_legacy.get_args_parser().parse_args(conv))
    assert list(bad) == ['r_b'] and 'unreadable' in bad['r_b']
    assert sorted(os.listdir(tmp_path / 'E')) == sorted(f'{v}.safetensors' for v in videos if v != 'r_b')
    for vid in videos.keys() - {'r_b'}:
        emb, starts, ends = load_video_embeddings(tmp_path / 'E' / f'{vid}.safetensors', with_times=True)
        torch.testing.assert_close(emb, legacy[vid] / 100)
        assert starts.tolist() == [5.0 * k for k in range(videos[vid])] and ends.tolist() == (starts + 5).tolist()
    mtime = os.path.getmtime(tmp_path / 'E' / 'r_a.safetensors')
    assert list(convert_legacy.main(convert_legacy.get_args_parser().parse_args(conv))) == ['r_b']
    assert os.path.getmtime(tmp_path / 'E' / 'r_a.safetensors') == mtime

    # the converted store gives the same CSV rows as the legacy files
    sdf.main(args('--dataset', 'pretrain', '--legacy_root', tmp_path / 'legacy', '--out_csv', tmp_path / 'leg.csv'))
    sdf.main(args('--dataset', 'pretrain', '--embedding_dir', tmp_path / 'E', '--out_csv', tmp_path / 'new.csv'))
    leg, new = read(tmp_path / 'leg.csv'), read(tmp_path / 'new.csv')
    assert leg.video_id.tolist() == sorted(videos) and new.video_id.tolist() == sorted(videos.keys() - {'r_b'})
    assert list(new.number_of_segments) == [videos[v] for v in new.video_id]

    # combining a legacy and a store CSV: both location columns, each row readable
    assert sdf.main(args('--combine', tmp_path / 'new.csv', tmp_path / 'leg.csv', '--out_csv', tmp_path / 'mix.csv')) \
        == len(new)
    rows = read_csv(tmp_path / 'mix.csv')
    assert [isinstance(r['source'], list) for r in rows] == [False] * len(new) + [True]  # r_b only in legacy
    for r in rows[:-1]:
        torch.testing.assert_close(load_row(r, input_size=D), legacy[r['video_id']] / 100)
    with pytest.raises(EmbeddingError, match=r'mix.csv row 8 \(video r_b\): .*r_b/0-5/langbind_output.pt'):
        load_row(rows[-1], csv_path=tmp_path / 'mix.csv')


def test_original_csv_listing_segments_in_text_order_reads_in_time_order(tmp_path):
    """The original release's CSVs may list a video's segment files as a sorted file listing does
    ('10-15' before '5-10'): they are read in time order, whole and by windows."""
    from util.datasets import VideoRows
    legacy = make_legacy(tmp_path / 'legacy', {'v': 12})['v'] / 100
    paths = sorted(str(p) for p in (tmp_path / 'legacy' / 'v').glob('*/langbind_output.pt'))
    assert os.path.basename(os.path.dirname(paths[1])) == '10-15'
    write(tmp_path / 'orig.csv', f'video_id,segment_paths,number_of_segments\nv,"{paths}",12\n')
    row = read_csv(tmp_path / 'orig.csv')[0]
    torch.testing.assert_close(load_row(row, input_size=D), legacy)
    with VideoRows(row, D) as v:
        torch.testing.assert_close(v.read(1, 4), legacy[1:4])


def test_legacy_segment_file_refused_or_misshapen_is_one_line(tmp_path):
    """A segment file safe loading refuses (here a numpy scalar as 'start'; nothing from it runs), or
    whose embedding is not one vector (it used to be flattened into a longer one): one line naming it."""
    folder = tmp_path / 'v' / '0-5'
    os.makedirs(folder)
    torch.save({'embedding': torch.randn(D), 'start': np.int64(0), 'end': 5}, folder / 'langbind_output.pt')
    with pytest.raises(EmbeddingError, match=r'0-5/langbind_output.pt: unreadable .*Unsupported global') as e:
        load_row({'video_id': 'v', 'row': 1, 'source': [str(folder / 'langbind_output.pt')]})
    assert '\n' not in str(e.value)
    torch.save({'embedding': torch.randn(2, D), 'start': 0, 'end': 5}, folder / 'langbind_output.pt')
    with pytest.raises(EmbeddingError, match=r'embedding of shape \(2, 8\), expected one vector'):
        load_row({'video_id': 'v', 'row': 1, 'source': [str(folder / 'langbind_output.pt')]})
    torch.save({'embedding': torch.randn(1, D), 'start': 0, 'end': 5}, folder / 'langbind_output.pt')
    assert load_row({'video_id': 'v', 'row': 1, 'source': [str(folder / 'langbind_output.pt')]}).shape == (1, D)


def test_converter_names_gaps_and_removes_temporaries_of_a_killed_run(tmp_path, capsys):
    legacy = make_legacy(tmp_path / 'legacy', {'g': 4, 'ok': 2})
    shutil.rmtree(tmp_path / 'legacy' / 'g' / '5-10')              # a segment the original run lost
    stale = tmp_path / 'E' / '.g.safetensors.x1y2.tmp'             # a conversion killed while writing
    write(stale, 'half')
    os.utime(stale, (0, 0))
    conv = ['--legacy_root', str(tmp_path / 'legacy'), '--embedding_dir', str(tmp_path / 'E'), '--dtype', 'fp32']
    assert convert_legacy.main(convert_legacy.get_args_parser().parse_args(conv)) == {}
    out = capsys.readouterr().out
    assert 'note: g: segments not back to back at 5 s -> 10 s' in out and '(1 with segments not back to back)' in out
    assert 'note: ok' not in out and not stale.exists()
    emb, starts, _ = load_video_embeddings(tmp_path / 'E' / 'g.safetensors', with_times=True)
    assert starts.tolist() == [0, 10, 15]
    torch.testing.assert_close(emb, legacy['g'][[0, 2, 3]] / 100)
    write(tmp_path / 'file', '')
    conv[3] = str(tmp_path / 'file' / 'E')
    with pytest.raises(EmbeddingError, match='file/E: cannot create the store folder'):
        convert_legacy.main(convert_legacy.get_args_parser().parse_args(conv))


# ---------------------------------------------------------------- protocol and hardening

def test_exclude_csv_removes_exactly_the_listed_ids(tmp_path):
    ids = [f'v{i}' for i in range(8)]
    make_store(tmp_path / 'A', ids)
    write(tmp_path / 'csv' / 'task' / 'val.csv', 'video_id,embedding_path,number_of_segments,label\n'
                                                 'v1,x,2,0\nv6,x,2,1\nnot_in_store,x,2,1\n')
    write(tmp_path / 'csv' / 'task' / 'test.csv', 'video_id,embedding_path,number_of_segments,label\nv3,x,2,0\n'
                                                  'v6,x,2,1\n')
    excl = [tmp_path / 'csv' / 'task' / 'val.csv', tmp_path / 'csv' / 'task' / 'test.csv']
    sdf.main(args('--dataset', 'pretrain', '--embedding_dir', tmp_path / 'A', '--out_csv', tmp_path / 'pre.csv',
                  '--exclude_csv', *excl))
    assert read(tmp_path / 'pre.csv').video_id.tolist() == ['v0', 'v2', 'v4', 'v5', 'v7']
    summary = json.load(open(tmp_path / 'pre_summary.json'))
    assert summary['excluded'] == 3 and summary['excluded_videos'] == ['v1', 'v3', 'v6']
    assert summary['videos'] == 5

    # --combine: the same ids are left out of a CSV that still holds them
    sdf.main(args('--dataset', 'pretrain', '--embedding_dir', tmp_path / 'A', '--out_csv', tmp_path / 'all.csv'))
    assert len(read(tmp_path / 'all.csv')) == 8
    sdf.main(args('--combine', tmp_path / 'all.csv', '--out_csv', tmp_path / 'comb.csv', '--exclude_csv', *excl))
    assert read(tmp_path / 'comb.csv').video_id.tolist() == ['v0', 'v2', 'v4', 'v5', 'v7']
    assert json.load(open(tmp_path / 'comb_summary.json'))['excluded'] == 3

    write(tmp_path / 'noid.csv', 'file_name\nv0\n')
    with pytest.raises(EmbeddingError, match='noid.csv: --exclude_csv needs a "video_id" column'):
        sdf.main(args('--dataset', 'pretrain', '--embedding_dir', tmp_path / 'A', '--out_csv', tmp_path / 'x.csv',
                      '--exclude_csv', tmp_path / 'noid.csv'))


def restamp(path, **metadata):
    """Rewrite a store file with other metadata (same embeddings)."""
    emb, starts, ends = load_video_embeddings(path, with_times=True)
    save_video_embeddings(path, emb, starts, ends, metadata, dtype=np.float32)


@pytest.mark.parametrize('stamps,words', [
    ({'r_b': {'model': 'LanguageBind_Video_FT'}}, "model 'LanguageBind_Video_Huge_V1.5_FT'.*different encoders"),
    ({'r_g': {'model': 'random_init:tiny', 'random_init': 1}}, 'different encoders'),
    ({'r_g': {'random_init': 1}}, 'randomly initialised encoder .*from real weights'),
])
def test_one_dataset_one_encoder(lvu, stamps, words):
    ann, store, _, out = lvu
    for vid in os.listdir(store):   # step 3's metadata on every file, then one odd file
        restamp(store / vid, model='LanguageBind_Video_Huge_V1.5_FT', random_init=0)
    sdf.main(args('--dataset', 'lvu', '--annotation_dir', ann, '--embedding_dir', store, '--out_dir', out / 'ok'))
    for vid, meta in stamps.items():
        restamp(store / f'{vid}.safetensors', **meta)
    for argv in (['--dataset', 'lvu', '--annotation_dir', ann, '--out_dir', out / 'mixed'],
                 ['--dataset', 'pretrain', '--out_csv', out / 'pre.csv']):
        with pytest.raises(EmbeddingError, match=words) as e:
            sdf.main(args(*argv, '--embedding_dir', store))
        assert f'{store / vid}.safetensors' in str(e.value) and str(e.value).count('.safetensors') == 2
    assert not os.path.exists(out / 'mixed') and not os.path.exists(out / 'pre.csv')  # stopped before writing
    with pytest.raises(EmbeddingError, match=words):  # --combine of CSVs made from the mixed store
        sdf.main(args('--combine', *(out / 'ok' / 'relationship' / f'{s}.csv' for s in sdf.SPLITS),
                      '--out_csv', out / 'comb.csv'))


def test_one_checkpoint_typed_as_two_paths_is_one_encoder(tmp_path):
    make_store(tmp_path / 'A', ['v0', 'v1', 'v2'])
    for vid, model in (('v0', 'checkpoints/LanguageBind_Video_Huge_V1.5_FT'),
                       ('v1', '/data/models/LanguageBind_Video_Huge_V1.5_FT/'), ('v2', None)):
        restamp(tmp_path / 'A' / f'{vid}.safetensors', **({'model': model} if model else {}))
    records, _ = sdf.main(args('--dataset', 'pretrain', '--embedding_dir', tmp_path / 'A',
                               '--out_csv', tmp_path / 'pre.csv'))
    assert [r['video_id'] for r in records] == ['v0', 'v1', 'v2']


def test_video_in_two_splits_stops(lvu):
    ann, store, _, out = lvu
    with open(ann / 'relationship' / 'test.csv', 'a') as f:
        f.write('1 wife r_b tt9\n')   # r_b is on line 3 of train.csv
    with pytest.raises(sdf.AnnotationError, match='video r_b is in train') as e:
        sdf.main(args('--dataset', 'lvu', '--annotation_dir', ann, '--embedding_dir', store, '--out_dir', out))
    assert f'{ann / "relationship" / "train.csv"} line 3' in str(e.value)
    assert f'{ann / "relationship" / "test.csv"} line 5' in str(e.value)
    assert not os.path.exists(out)


def test_video_twice_with_two_labels_stops_and_same_label_is_kept_once(lvu, tmp_path):
    ann, store, _, out = lvu
    with open(ann / 'relationship' / 'val.csv', 'a') as f:
        f.write('1 wife r_e tt9\n')   # repeat of line 2, same label
    sdf.main(args('--dataset', 'lvu', '--annotation_dir', ann, '--embedding_dir', store, '--out_dir', out,
                  '--tasks', 'relationship'))
    assert read(out / 'relationship' / 'val.csv').video_id.tolist() == ['r_e', 'r_f']
    assert json.load(open(out / 'relationship' / 'summary.json'))['val']['repeated_rows'] == 1
    with open(ann / 'relationship' / 'val.csv', 'a') as f:
        f.write('2 husband r_e tt9\n')
    with pytest.raises(sdf.AnnotationError, match=r'video r_e has label 1 \(.*val.csv line 2\) and label 2 '
                                                  r'\(.*val.csv line 5\)'):
        sdf.main(args('--dataset', 'lvu', '--annotation_dir', ann, '--embedding_dir', store, '--out_dir', out))

    names = ['cereals', 'coffee']   # Breakfast: a training video also in test
    write(tmp_path / 'bf' / 'train.csv', 'file_name,duration,action,class_id\n' + ''.join(
        f'P{p:02d}_{names[c]},5,{names[c]},{c}\n' for p in range(3, 8) for c in (0, 1)))
    write(tmp_path / 'bf' / 'test.csv', 'file_name,duration,action,class_id\nP40_coffee,5,coffee,1\n'
                                        'P05_cereals,5,cereals,0\n')
    with pytest.raises(sdf.AnnotationError, match=r'P05_cereals is in train \(.*train.csv line 6\) and in test '
                                                  r'\(.*test.csv line 3\)'):
        sdf.main(args('--dataset', 'breakfast', '--annotation_dir', tmp_path / 'bf', '--embedding_dir', store,
                      '--output_dir', tmp_path / 'bf_out'))


@pytest.mark.parametrize('rows,where,fields', [
    ('v1,a.safetensors,3,extra\nv2,b.safetensors,4\n', 'row 1 (line 2)', 4),   # pandas: an index column
    ('v1,a.safetensors,3\nv2,b.safetensors,4,extra\n', 'row 2 (line 3)', 4),
    ('v1,a.safetensors,3\n\nv2\n', 'row 2 (line 4)', 1),
])
def test_csv_row_with_wrong_field_count_is_named(tmp_path, rows, where, fields):
    write(tmp_path / 'x.csv', 'video_id,embedding_path,number_of_segments\n' + rows)
    with pytest.raises(EmbeddingError) as e:
        read_csv(tmp_path / 'x.csv')
    assert str(e.value) == (f'{tmp_path / "x.csv"} {where}: {fields} fields, but the header has 3 '
                            f'(video_id,embedding_path,number_of_segments)')


def test_output_dir_flag_and_out_dir_alias(lvu):
    ann, store, _, out = lvu
    for flag, folder in (('--output_dir', out / 'new'), ('--out_dir', out / 'old')):
        sdf.main(args('--dataset', 'lvu', '--annotation_dir', ann, '--embedding_dir', store, flag, folder,
                      '--tasks', 'view_count'))
    assert read(out / 'new' / 'view_count' / 'test.csv').equals(read(out / 'old' / 'view_count' / 'test.csv'))
