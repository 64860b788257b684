"""Pretraining on SLURM through submitit: every flag of main_pretrain.py, plus --nodes, --ngpus, --timeout,
--partition, --job_dir (util/slurm.py). Run it from the repository root.

  python submitit_pretrain.py --nodes 4 --ngpus 8 --partition gpu --batch_size 16 --data_path data/csv \
      --output_dir output_dir/pretrain

Each process gets the environment torchrun would give it, so main_pretrain.py runs as under torchrun.
On preemption or timeout the job requeues itself and resumes from the newest checkpoint-*.pth in
--output_dir (work since the last checkpoint is redone: keep --save_every short on preemptible
partitions). Global batch = batch_size x ngpus x nodes x accum_iter.
"""
import main_pretrain
from util.errors import run_main
from util.misc import newest_checkpoint
from util.slurm import Job, check_launcher_args, submit, wrapping_parser


class PretrainJob(Job):
    def requeued_args(self):
        """Resume from the newest checkpoint the job wrote (also when it started from --resume)."""
        args = super().requeued_args()
        newest = newest_checkpoint(args.output_dir)
        if newest:
            args.resume = newest
        return args


def get_args_parser():
    return wrapping_parser('LV-MAE pretraining on SLURM (submitit)', main_pretrain.get_args_parser(), ngpus=8)


def check_args(parser, args):
    check_launcher_args(parser, args)
    if args.world_size is not None and args.world_size != args.nodes * args.ngpus:
        parser.error(f'--world_size {args.world_size} but --nodes {args.nodes} x --ngpus {args.ngpus} start '
                     f'{args.nodes * args.ngpus} processes')


def main(args, job_class=PretrainJob):
    return submit(args, job_class('main_pretrain', args), name='lvmae_pretrain')


if __name__ == '__main__':
    parser = get_args_parser()
    args = parser.parse_args()
    check_args(parser, args)
    run_main(main, args)
