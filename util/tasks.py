"""Benchmark task definitions: the head size of each task comes from here (or from the
``task.json`` that step 4 writes beside a task's CSVs), never from the labels of one split."""
import json
import os
from dataclasses import asdict, dataclass, field

SPLITS = ('train', 'val', 'test')   # the split names of every task folder: <task>/{train,val,test}.csv

LVU_CLASSIFICATION = {  # paper's column order
    'relationship': 4, 'way_speaking': 5, 'scene': 6, 'director': 10, 'genre': 4, 'writer': 10, 'year': 9,
}
LVU_REGRESSION = ('like_ratio', 'view_count')
LVU_TASKS = tuple(LVU_CLASSIFICATION) + LVU_REGRESSION

# LVU regression targets as distributed by ViS4mer (docs/DATA.md, step 4)
LIKE_RATIO_OFFSET = 9.138220535629456   # target = 10 * like / (like + dislike) - offset
VIEW_COUNT_OFFSET = 11.76425435683139   # target = ln(view_count) - offset

BREAKFAST_CLASSES = ('cereals', 'coffee', 'tea', 'pancake', 'friedegg', 'scrambledegg', 'sandwich',
                     'juice', 'milk', 'salat')
COIN_NUM_CLASSES = 180

GROUPS = {
    'lvu': LVU_TASKS,
    'all': LVU_TASKS + ('breakfast', 'coin'),
}

COLUMN_NAMES = {'relationship': 'Rel', 'way_speaking': 'Speak', 'scene': 'Scene', 'director': 'Dir',
                'genre': 'Genre', 'writer': 'Writer', 'year': 'Year', 'like_ratio': 'Like',
                'view_count': 'View', 'breakfast': 'Breakfast', 'coin': 'COIN'}


@dataclass
class Task:
    name: str
    num_classes: int          # 1 for regression
    regression: bool = False
    class_names: list = field(default_factory=list)

    @property
    def metric(self):
        return 'mse' if self.regression else 'top1'

    def save(self, folder):
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, 'task.json'), 'w') as f:
            json.dump(asdict(self), f, indent=1)


def builtin_task(name):
    if name in LVU_CLASSIFICATION:
        return Task(name, LVU_CLASSIFICATION[name])
    if name in LVU_REGRESSION:
        return Task(name, 1, regression=True)
    if name == 'breakfast':
        return Task(name, len(BREAKFAST_CLASSES), class_names=list(BREAKFAST_CLASSES))
    if name == 'coin':
        return Task(name, COIN_NUM_CLASSES)
    return None


def get_task(name, data_path=None):
    """Definition of ``name``: ``<data_path>/<name>/task.json`` if present, else the built-in one."""
    if data_path is not None:
        p = os.path.join(data_path, name, 'task.json')
        if os.path.isfile(p):
            try:
                with open(p, encoding='utf-8') as f:
                    d = json.load(f)
                return Task(d['name'], int(d['num_classes']), bool(d.get('regression', False)),
                            list(d.get('class_names', [])))
            except (ValueError, KeyError, TypeError) as e:  # not JSON, not UTF-8, a key missing, a wrong type
                raise ValueError(f'{p}: not a task definition as step 4 writes it '
                                 f'({type(e).__name__}: {e})') from None
    task = builtin_task(name)
    if task is None:
        raise ValueError(f'unknown task {name!r}: not one of {", ".join(GROUPS["all"])} and no '
                         f'{os.path.join(str(data_path), name, "task.json")}')
    return task


def expand_tasks(names):
    """``['lvu']`` -> the 9 LVU tasks; other names pass through, order kept, duplicates dropped."""
    out = []
    for n in names:
        for t in GROUPS.get(n, (n,)):
            if t not in out:
                out.append(t)
    return out
