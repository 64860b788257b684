"""Attentive or linear probing on SLURM through submitit: --probe ap|lp, every flag of that probe script
(test_ap_movie_clip.py / test_lp_movie_clip.py), plus --timeout, --partition, --job_dir (util/slurm.py).
Run it from the repository root.

  python submitit_probe.py --probe ap --partition gpu --task lvu --resume output_dir/pretrain/checkpoint-149.pth \
      --data_path data/csv --output_dir output_dir/probe_ap

A probe runs in one process on one GPU (--nodes 1 --ngpus 1). On preemption or timeout the job requeues
itself and runs the probe again from the start (probes have no checkpoints; they are short).
"""
import argparse
import importlib
import sys

from util.errors import run_main
from util.slurm import Job, check_launcher_args, submit, wrapping_parser

ENTRY = {'ap': 'test_ap_movie_clip', 'lp': 'test_lp_movie_clip'}   # the scripts users type


def get_args_parser(argv=None):
    """The probe (--probe, default ap) decides which script's flags are accepted."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument('--probe', choices=sorted(ENTRY), default='ap')
    probe = pre.parse_known_args(sys.argv[1:] if argv is None else argv)[0].probe
    wrapped = importlib.import_module(ENTRY[probe]).get_args_parser(probe)
    p = wrapping_parser(f'LV-MAE probing on SLURM (submitit); flags of {ENTRY[probe]}.py', wrapped, ngpus=1)
    p.add_argument('--probe', choices=sorted(ENTRY), default='ap', help='ap: attentive, lp: linear')
    return p


def check_args(parser, args):
    check_launcher_args(parser, args)
    if args.nodes != 1 or args.ngpus != 1:
        parser.error('a probe runs in one process: use --nodes 1 --ngpus 1 (submit several jobs for several '
                     'probes)')


def main(args, job_class=Job):
    return submit(args, job_class(ENTRY[args.probe], args), name=f'lvmae_probe_{args.probe}')


if __name__ == '__main__':
    parser = get_args_parser()
    args = parser.parse_args()
    check_args(parser, args)
    run_main(main, args)
