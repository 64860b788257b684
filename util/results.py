"""The probes' results: ``results.json`` (everything, including the protocol of the run) and
``results.md`` (one table row in the paper's column order)."""
import json
import os

import numpy as np

from util.fileio import atomic_write_text
from util.tasks import COLUMN_NAMES, LVU_CLASSIFICATION

BASELINE_NAMES = {
    None: 'LV-MAE ({ckpt}) + {probe}',
    'raw': 'raw embeddings + {probe}',
    'random_init': 'LV-MAE architecture{of}, RANDOM INIT (no pretraining) + {probe}',
}


def classification_avg(tasks):
    accs = [r['test_mean'] for r in tasks.values() if r.get('metric') == 'top1']
    return float(np.mean(accs)) if accs else None


def method_name(summary):
    """The table's row name: what was probed (pretrained encoder, raw embeddings, untrained encoder)."""
    ckpt = os.path.basename(summary['checkpoint']) if summary.get('checkpoint') else None
    name = BASELINE_NAMES[summary['baseline']].format(
        ckpt=ckpt, probe=summary['probe'].upper(), of=f' of {ckpt}' if ckpt else '')
    if summary['random_encoder']:
        name += ' [RANDOM LanguageBind embeddings: pipeline test only]'
    return name


def results_markdown(summary, regression):
    """One-row table in the paper's column order; ``regression``: task name -> bool. 'Avg' (mean
    top-1 of the classification columns) follows the LVU classification columns when those are the
    only classification tasks, else it comes last."""
    order = list(COLUMN_NAMES)
    names = sorted(summary['tasks'], key=lambda n: order.index(n) if n in order else len(order))
    cls = [n for n in names if not regression[n]]
    cols = list(names)
    if cls:
        cols.insert(names.index(cls[-1]) + 1 if all(n in LVU_CLASSIFICATION for n in cls) else len(names), None)

    def cell(n):
        if n is None:
            return f'{summary["classification_avg"]:.2f}' if summary['classification_avg'] is not None else '-'
        r = summary['tasks'][n]
        if 'skipped' in r:
            return 'skipped*'
        digits = 3 if r['metric'] == 'mse' else 2
        return f'{r["test_mean"]:.{digits}f} ± {r["test_std"]:.{digits}f}'

    header = ['Method'] + [COLUMN_NAMES.get(n, n) if n else 'Avg' for n in cols]
    lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header),
             '| ' + ' | '.join([method_name(summary)] + [cell(n) for n in cols]) + ' |', '']
    seeds = {len(r['per_seed']) for r in summary['tasks'].values() if 'per_seed' in r}
    reg = [n for n in names if regression[n]]
    lines.append(f'Test score at the epoch with the best val score; mean ± std (population std, ddof 0) over '
                 f'{max(seeds, default=0)} seed(s). '
                 'Top-1 % for classification' + (f', MSE (lower is better) for {", ".join(reg)}.' if reg else '.'))
    if cls:
        lines.append(f'Avg: mean top-1 over {", ".join(n for n in cls if "skipped" not in summary["tasks"][n])}.')
    swept = {n: r for n, r in summary['tasks'].items() if len(r.get('grid', ())) > 1}
    if swept:
        lines.append('Sweep: each task reports the (lr, weight decay) with the best mean val score: ' + '; '.join(
            f'{n} lr {r["lr"]:g} wd {r["weight_decay"]:g}' for n, r in swept.items()) + ' (full grid in results.json).')
    if summary['baseline'] == 'random_init':
        lines.append('Control: the encoder has the architecture of the checkpoint (or the flags) but random '
                     'weights (initialised from each seed): it shows what the architecture alone gives.')
    lines += [f'*{n}: skipped, {r["skipped"]}.' for n, r in summary['tasks'].items() if 'skipped' in r]
    return '\n'.join(lines) + '\n'


def write_results(output_dir, summary, regression):
    md = results_markdown(summary, regression)
    atomic_write_text(os.path.join(output_dir, 'results.json'), json.dumps(summary, indent=1))
    atomic_write_text(os.path.join(output_dir, 'results.md'), md)
    return md
