"""Launching the training scripts on SLURM through submitit (as MAE's submitit_pretrain.py).

Each task of a job gets the environment torchrun would give it (RANK, WORLD_SIZE, LOCAL_RANK,
LOCAL_WORLD_SIZE, GROUP_RANK, MASTER_ADDR, MASTER_PORT) before the wrapped script's ``main(args)`` runs,
so the scripts have one code path for torchrun and SLURM. On preemption or timeout submitit calls the
job's ``checkpoint()``, which resubmits it; the script then resumes from the newest checkpoint in
``--output_dir``. docs/PRETRAIN.md shows the commands.
"""
import argparse
import copy
import importlib
import os
import sys
import zlib

from util.errors import InputError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))   # the repository: the scripts live here


def add_launcher_args(parser, ngpus=8):
    g = parser.add_argument_group('SLURM (submitit)')
    g.add_argument('--nodes', type=int, default=1, help='nodes per job')
    g.add_argument('--ngpus', type=int, default=ngpus,
                   help='GPUs per node, one process each (with --device cpu: processes per node)')
    g.add_argument('--timeout', type=int, default=4320,
                   help='minutes per job; at the limit (or on preemption) the job requeues itself and resumes')
    g.add_argument('--partition', default=None, help='SLURM partition')
    g.add_argument('--account', default=None, help='SLURM account, where the cluster needs one')
    g.add_argument('--job_dir', default=None, help='submitit job files and logs (default: <output_dir>/submitit)')
    g.add_argument('--cpus_per_task', type=int, default=10, help='CPUs per process (data loading)')
    g.add_argument('--mem_gb', type=int, default=None, help='memory per node (default: 40 GB per process)')
    g.add_argument('--slurm_arg', action='append', default=[], metavar='KEY=VALUE',
                   help='another sbatch option, e.g. --slurm_arg qos=high --slurm_arg constraint=a100')
    g.add_argument('--cluster', choices=['slurm', 'local', 'debug'], default=None,
                   help='default: slurm where srun is found, else local (this machine, for trying the launcher)')
    return g


def wrapping_parser(description, wrapped, ngpus=8):
    """A parser with every flag of ``wrapped`` (its parser as a parent) and the launcher flags.
    ``--device`` defaults to ``auto``: resolved in each task, on the machine that runs it."""
    p = argparse.ArgumentParser(description=description, parents=[wrapped], add_help=False)
    add_launcher_args(p, ngpus)
    p.set_defaults(device='auto')
    return p


def check_launcher_args(parser, args):
    for flag in ('nodes', 'ngpus', 'timeout', 'cpus_per_task'):
        if getattr(args, flag) < 1:
            parser.error(f'argument --{flag}: must be at least 1, got {getattr(args, flag)}')
    for kv in args.slurm_arg:
        if '=' not in kv:
            parser.error(f'argument --slurm_arg: expected KEY=VALUE, got {kv!r}')


def torchrun_environment(job_env):
    """The variables torchrun sets for one process, from submitit's ``JobEnvironment``. The rendezvous is
    the first node of the job, on a port derived from the job id (the same in every task)."""
    per_node = job_env.num_tasks // job_env.num_nodes
    return {
        'RANK': str(job_env.global_rank), 'WORLD_SIZE': str(job_env.num_tasks),
        'LOCAL_RANK': str(job_env.local_rank), 'LOCAL_WORLD_SIZE': str(per_node),
        'GROUP_RANK': str(job_env.node), 'ROLE_RANK': str(job_env.global_rank),
        'ROLE_WORLD_SIZE': str(job_env.num_tasks),
        'MASTER_ADDR': '127.0.0.1' if job_env.num_nodes == 1 else job_env.hostnames[0],
        'MASTER_PORT': str(20000 + zlib.crc32(str(job_env.job_id).encode()) % 20000),
    }


def set_torchrun_environment(job_env):
    env = torchrun_environment(job_env)
    if int(env['LOCAL_WORLD_SIZE']) > 1 and 'OMP_NUM_THREADS' not in os.environ:
        env['OMP_NUM_THREADS'] = '1'   # torchrun's default with several processes per node
        if 'torch' in sys.modules:
            sys.modules['torch'].set_num_threads(1)
    os.environ.update(env)
    return env


class Job:
    """The callable submitit runs in every task: ``<module>.main(args)`` under a torchrun-like environment.
    Its ``checkpoint()`` (called by submitit on preemption or timeout) resubmits the job."""

    def __init__(self, module, args):
        self.module, self.args = module, args

    def __call__(self):
        import submitit
        env = set_torchrun_environment(submitit.JobEnvironment())
        if ROOT not in sys.path:
            sys.path.insert(0, ROOT)
        args = copy.deepcopy(self.args)   # main() writes to its args; a requeue starts from the given ones
        from util.misc import default_device   # imports torch: only in the task, not on the login node
        args.device = default_device(args.device)
        print(f'task {env["RANK"]} of {env["WORLD_SIZE"]} (local rank {env["LOCAL_RANK"]}), rendezvous '
              f'{env["MASTER_ADDR"]}:{env["MASTER_PORT"]}, device {args.device}', flush=True)
        return importlib.import_module(self.module).main(args)

    def requeued_args(self):
        """Arguments of the resubmitted job (the same by default)."""
        return copy.deepcopy(self.args)

    def checkpoint(self):
        import submitit
        return submitit.helpers.DelayedSubmission(type(self)(self.module, self.requeued_args()))


def make_executor(args, name):
    """submitit's executor for the launcher flags (SLURM where ``srun`` is found, unless --cluster says)."""
    import submitit
    folder = args.job_dir or os.path.join(args.output_dir, 'submitit')
    executor = submitit.AutoExecutor(folder=folder, cluster=args.cluster)
    if executor.cluster != 'slurm' and args.nodes > 1:
        raise InputError(f'--nodes {args.nodes}: the {executor.cluster} executor runs on this machine only '
                         f'(no SLURM found); use --nodes 1')
    gpus = 0 if args.device == 'cpu' else args.ngpus
    executor.update_parameters(
        name=name, nodes=args.nodes, tasks_per_node=args.ngpus, gpus_per_node=gpus,
        cpus_per_task=args.cpus_per_task, mem_gb=args.mem_gb or 40 * args.ngpus, timeout_min=args.timeout,
        slurm_partition=args.partition, slurm_account=args.account, slurm_signal_delay_s=120,
        slurm_additional_parameters=dict(kv.split('=', 1) for kv in args.slurm_arg))
    return executor, folder


def submit(args, job, name):
    """Submit ``job`` with the launcher flags; returns submitit's job. On the local and debug 'clusters'
    this waits for the result, so a failure is raised here."""
    executor, folder = make_executor(args, name)
    job = executor.submit(job)
    print(f'{executor.cluster}: job {job.job_id}, {args.nodes} node(s) x {args.ngpus} process(es); logs in {folder}')
    if executor.cluster in ('local', 'debug'):
        job.results()
    return job
