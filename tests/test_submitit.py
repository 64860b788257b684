"""SLURM launchers (submitit_pretrain.py, submitit_probe.py) on CPU with submitit's local executor: the
same processes and environment as on a SLURM node, started by submitit's local controller."""
import json
import os
import signal
import subprocess
import sys
from types import SimpleNamespace

import cloudpickle
import numpy as np
import pandas as pd
import pytest
import torch

import main_pretrain
import submitit_pretrain
import submitit_probe
from util.checkpoint import load_checkpoint
from util.embeddings import embedding_path, save_video_embeddings
from util.errors import InputError
from util.slurm import make_executor, torchrun_environment
from util.tasks import Task

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
D = 16
TINY = ['--input_size', str(D), '--depth', '1', '--num_heads', '2', '--decoder_embed_dim', '8',
        '--decoder_depth', '1', '--decoder_num_heads', '2', '--num_patches', '16', '--mask_ratio', '0.5',
        '--num_workers', '0', '--print_freq', '1000', '--warmup_epochs', '1', '--seed', '5', '--device', 'cpu',
        '--batch_size', '2', '--epochs', '2', '--save_every', '1', '--lr', '1e-3']


# ---------------------------------------------------------------- flags and environment (fast)

def test_launcher_accepts_every_flag_of_the_wrapped_script():
    wrapped = {s for a in main_pretrain.get_args_parser()._actions for s in a.option_strings}
    launcher = submitit_pretrain.get_args_parser()
    assert wrapped <= {s for a in launcher._actions for s in a.option_strings}
    args = launcher.parse_args(['--nodes', '2', '--ngpus', '4', '--batch_size', '16', '--accum_iter', '2'])
    assert (args.nodes, args.ngpus, args.batch_size, args.accum_iter, args.device) == (2, 4, 16, 2, 'auto')
    with pytest.raises(SystemExit):   # --world_size must equal nodes x ngpus
        submitit_pretrain.check_args(launcher, launcher.parse_args(['--nodes', '2', '--world_size', '8']))
    submitit_pretrain.check_args(launcher, launcher.parse_args(['--nodes', '2', '--world_size', '16']))


def test_probe_launcher_takes_the_chosen_probe_flags():
    for probe in ('ap', 'lp'):
        p = submitit_probe.get_args_parser(['--probe', probe])
        args = p.parse_args(['--probe', probe, '--task', 'scene', '--partition', 'gpu'])
        assert args.probe == probe and args.task == ['scene'] and args.ngpus == 1 and args.partition == 'gpu'
        with pytest.raises(SystemExit):
            submitit_probe.check_args(p, p.parse_args(['--ngpus', '2']))


def test_torchrun_environment_from_slurm_tasks():
    """16 tasks on 2 nodes: the variables torchrun would set, one rendezvous for all tasks."""
    envs = [torchrun_environment(SimpleNamespace(num_tasks=16, num_nodes=2, node=r // 8, global_rank=r,
                                                 local_rank=r % 8, job_id='4242', hostnames=['gpu017', 'gpu018']))
            for r in range(16)]
    assert [e['RANK'] for e in envs] == [str(r) for r in range(16)]
    assert [e['LOCAL_RANK'] for e in envs] == [str(r % 8) for r in range(16)]
    assert {(e['WORLD_SIZE'], e['LOCAL_WORLD_SIZE'], e['MASTER_ADDR'], e['MASTER_PORT']) for e in envs} == \
        {('16', '8', 'gpu017', envs[0]['MASTER_PORT'])}
    assert [e['GROUP_RANK'] for e in envs] == ['0'] * 8 + ['1'] * 8
    assert 20000 <= int(envs[0]['MASTER_PORT']) < 40000


def test_requeued_pretraining_resumes_from_the_newest_checkpoint(tmp_path):
    args = submitit_pretrain.get_args_parser().parse_args(['--output_dir', str(tmp_path), '--resume', 'start.pth'])
    job = submitit_pretrain.PretrainJob('main_pretrain', args)
    requeued = job.checkpoint().function
    assert requeued.args.resume == 'start.pth'     # nothing written yet: the given start point
    for n in (0, 2, 10):
        (tmp_path / f'checkpoint-{n}.pth').write_bytes(b'')
    requeued = job.checkpoint().function
    assert isinstance(requeued, submitit_pretrain.PretrainJob)
    assert requeued.args.resume == str(tmp_path / 'checkpoint-10.pth') and args.resume == 'start.pth'


def test_sbatch_script_for_nodes_gpus_partition_and_requeue(tmp_path, monkeypatch):
    """The job SLURM would get (a stand-in ``srun`` makes submitit build its sbatch script here)."""
    srun = tmp_path / 'bin' / 'srun'
    srun.parent.mkdir()
    srun.write_text('#!/bin/sh\n')
    srun.chmod(0o755)
    monkeypatch.setenv('PATH', f'{srun.parent}{os.pathsep}{os.environ["PATH"]}')
    parser = submitit_pretrain.get_args_parser()
    args = parser.parse_args(['--nodes', '4', '--ngpus', '8', '--partition', 'gpu', '--timeout', '600',
                              '--account', 'proj', '--slurm_arg', 'qos=high', '--output_dir', str(tmp_path / 'o')])
    executor, folder = make_executor(args, 'lvmae_pretrain')
    assert executor.cluster == 'slurm' and folder == str(tmp_path / 'o' / 'submitit')
    script = executor._executor._make_submission_file_text('python -u -m submitit.core._submit X', 'uid')
    for line in ('--nodes=4', '--ntasks-per-node=8', '--gpus-per-node=8', '--partition=gpu', '--time=600',
                 '--account=proj', '--qos=high', '--signal=USR2@120', '--cpus-per-task=10', '--mem=320GB'):
        assert f'#SBATCH {line}\n' in script, line
    with pytest.raises(InputError, match='--nodes 4: the local executor'):
        make_executor(parser.parse_args(['--nodes', '4', '--cluster', 'local']), 'x')


def test_probe_job_runs_the_probe_script(tmp_path, capsys):
    """submitit_probe.py on submitit's debug executor (the job runs in this process): the probe's results."""
    rng = np.random.default_rng(0)
    folder = tmp_path / 'csv' / 'two'
    Task('two', 2).save(folder)
    for split in ('train', 'val', 'test'):
        rows = []
        for i in range(4):
            vid, n = f'{split}{i}', 3 + i
            path = embedding_path(tmp_path / 'emb', vid)
            save_video_embeddings(path, rng.standard_normal((n, D)) + (i % 2), np.arange(n) * 5.0,
                                  np.arange(1, n + 1) * 5.0, dtype=np.float32)
            rows.append({'video_id': vid, 'embedding_path': path, 'number_of_segments': n, 'label': i % 2,
                         'label_name': f'c{i % 2}', 'split': split})
        pd.DataFrame(rows).to_csv(folder / f'{split}.csv', index=False)
    argv = ['--probe', 'lp', '--cluster', 'debug', '--task', 'two', '--data_path', str(tmp_path / 'csv'),
            '--baseline', 'raw', '--epochs', '1', '--batch_size', '2', '--input_size', str(D), '--device', 'cpu',
            '--output_dir', str(tmp_path / 'out')]
    parser = submitit_probe.get_args_parser(argv)
    args = parser.parse_args(argv)
    submitit_probe.check_args(parser, args)
    saved = dict(os.environ)
    try:
        submitit_probe.main(args)
    finally:
        os.environ.clear()
        os.environ.update(saved)
    assert 'task 0 of 1 (local rank 0), rendezvous 127.0.0.1' in capsys.readouterr().out
    results = json.load(open(tmp_path / 'out' / 'results.json'))
    assert 'two' in results['tasks']


# ---------------------------------------------------------------- local executor, 2 processes (Gloo)

def random_walks(folder, lengths, seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for i, n in enumerate(lengths):
        x = np.cumsum(0.3 * rng.standard_normal((n, D)), axis=0) + rng.standard_normal(D)
        path = embedding_path(os.path.join(folder, 'emb'), f'v{i}')
        save_video_embeddings(path, x, np.arange(n) * 5.0, np.arange(1, n + 1) * 5.0, dtype=np.float32)
        rows.append({'video_id': f'v{i}', 'embedding_path': path, 'number_of_segments': n})
    csv = os.path.join(folder, 'combined.csv')
    pd.DataFrame(rows).to_csv(csv, index=False)
    return csv


class PreemptedAfterFirstCheckpoint(submitit_pretrain.PretrainJob):
    """Sends itself what SLURM sends before preempting a job, once, right after the first checkpoint."""

    def __call__(self):
        import util.misc as misc
        marker, save = os.path.join(self.args.job_dir, 'preempted'), misc.save_model

        def save_then_preempt(*a, **kw):
            save(*a, **kw)
            if misc.is_main_process() and not os.path.exists(marker):
                open(marker, 'w').close()
                os.kill(os.getpid(), signal.SIGUSR2)
        misc.save_model = save_then_preempt
        return super().__call__()


cloudpickle.register_pickle_by_value(sys.modules[__name__])   # the task processes cannot import this file


def model_tensors(output_dir, epoch=1):
    return load_checkpoint(os.path.join(output_dir, f'checkpoint-{epoch}.pth'))['model']


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
    """The same tiny pretraining twice: torchrun with 2 processes, and submitit_pretrain.py with 2 tasks on
    the local executor, preempted once right after its first checkpoint (requeued, then resumed)."""
    folder = str(tmp_path_factory.mktemp('submitit'))
    csv = random_walks(folder, np.random.default_rng(1).integers(4, 20, size=8))
    torchrun_out, out, jobs = (os.path.join(folder, d) for d in ('torchrun_run', 'submitit_run', 'jobs'))
    r = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2',
                        'main_pretrain.py'] + TINY + ['--data_path', csv, '--output_dir', torchrun_out],
                       cwd=ROOT, env={**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONPATH': ROOT},
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]

    env = {'PYTHONPATH': ROOT + os.pathsep + os.environ.get('PYTHONPATH', ''), 'OMP_NUM_THREADS': '1'}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)   # inherited by submitit's local controller and its tasks
    try:
        parser = submitit_pretrain.get_args_parser()
        args = parser.parse_args(TINY + ['--cluster', 'local', '--nodes', '1', '--ngpus', '2', '--timeout', '60',
                                         '--data_path', csv, '--output_dir', out, '--job_dir', jobs])
        submitit_pretrain.check_args(parser, args)
        job = submitit_pretrain.main(args, job_class=PreemptedAfterFirstCheckpoint)
    finally:
        for k, v in old.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    return SimpleNamespace(torchrun=torchrun_out, submitit=out, jobs=jobs, job=job)


@pytest.mark.slow
def test_submitit_two_tasks_write_the_torchrun_checkpoint(runs):
    """checkpoint-0.pth is written by the job's first run, before it is preempted."""
    a, b = model_tensors(runs.submitit, epoch=0), model_tensors(runs.torchrun, epoch=0)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ckpt = load_checkpoint(os.path.join(runs.submitit, 'checkpoint-0.pth'))
    saved = ckpt['args'] if isinstance(ckpt['args'], dict) else vars(ckpt['args'])
    assert saved['world_size'] == 2 and saved['distributed'] and saved['device'] == 'cpu'


@pytest.mark.slow
def test_preempted_job_requeues_and_ends_like_an_uninterrupted_one(runs):
    assert os.path.exists(os.path.join(runs.jobs, 'preempted'))
    log = (runs.job.task(0).stdout() or '') + (runs.job.task(0).stderr() or '')
    assert 'this job is preempted' in log and 'Requeued job' in log, log[-3000:]
    assert 'checkpoint-0.pth: continuing at epoch 1' in log, log[-3000:]
    a, b = model_tensors(runs.submitit), model_tensors(runs.torchrun)
    init = model_tensors(runs.torchrun, epoch=0)
    assert any(not torch.equal(b[k], init[k]) for k in b)   # it trained after the first checkpoint
    for k in a:
        assert torch.equal(a[k], b[k]), k
