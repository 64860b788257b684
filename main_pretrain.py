"""Pretrain LV-MAE on segment embeddings.

One process:  python main_pretrain.py --data_path data/combined.csv ...
One node:     torchrun --nproc_per_node 8 main_pretrain.py ...
Many nodes:   torchrun --nnodes 2 --node_rank R --nproc_per_node 8 --rdzv_backend c10d \
                --rdzv_endpoint HOST:29500 main_pretrain.py ...
"""
import argparse
import datetime
import json
import os
import time

import numpy as np
import torch

import util.misc as misc
from engine_pretrain import evaluate, param_groups, train_one_epoch, trivial_losses
from models_lvmae import ARCH_KEYS, ENCODER_KEYS, LOSS_REDUCTIONS, LVMAE, SEMANTIC_ORDERS, resolve_input_scale
from util.datasets import PretrainDataset, collate_built
from util.errors import InputError, run_main
from util.fileio import FolderLock


VAL_LOSS_MEANING = {'batch': 'mean over all masked tokens of the validation set',
                    'video': 'mean over validation videos of each video\'s masked-token mean'}


def input_scale_arg(value):
    """--input_scale: 'auto' or a positive number (checked here; resolved when the model is built)."""
    try:
        resolve_input_scale(value, 2)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return value


def get_args_parser():
    p = argparse.ArgumentParser('LV-MAE pretraining', add_help=True)
    p.add_argument('--batch_size', default=16, type=int, help='videos per process per step')
    p.add_argument('--epochs', default=150, type=int)
    p.add_argument('--accum_iter', default=1, type=int,
                   help='gradient accumulation steps (global batch = batch_size * world size * accum_iter)')
    p.add_argument('--max_steps_per_epoch', default=None, type=int, help='cap on steps per epoch (tests, benchmarks)')

    # model
    p.add_argument('--input_size', default=1024, type=int, help='segment embedding size (= encoder width unless --embed_dim)')
    p.add_argument('--embed_dim', default=None, type=int,
                   help='encoder width if it differs from --input_size (adds an input projection)')
    p.add_argument('--num_patches', default=256, type=int, help='longest sequence in segments (256 x 5 s = 21 min)')
    p.add_argument('--depth', default=32, type=int)
    p.add_argument('--num_heads', default=16, type=int)
    p.add_argument('--decoder_embed_dim', default=512, type=int)
    p.add_argument('--decoder_depth', default=8, type=int)
    p.add_argument('--decoder_num_heads', default=16, type=int)
    p.add_argument('--mlp_ratio', default=4.0, type=float)
    p.add_argument('--input_scale', default='1.0', type=input_scale_arg,
                   help='multiply the input embeddings by this before the encoder (targets stay unit-norm): a '
                        'number, or auto = sqrt(encoder width / 2), the norm of a sin-cos position row (22.6 at '
                        '1024). Default 1.0 as released; saved in the checkpoint (as a number), so the probes '
                        'apply it. See docs/PRETRAIN.md')
    p.add_argument('--mask_ratio', default=0.5, type=float, help='fraction of each video\'s segments masked')
    p.add_argument('--masking_strategy', action='store_true',
                   help='semantic masking (ordered by cosine similarity to the previous segment) instead of random')
    p.add_argument('--semantic_order', default='keep_changes', choices=SEMANTIC_ORDERS,
                   help='with --masking_strategy: keep_changes keeps the change points (least similar to the '
                        'previous segment) and masks the most redundant segments, as the released checkpoint '
                        'was trained; mask_changes masks the change points, which is what the paper\'s text describes')
    p.add_argument('--norm_pix_loss', action='store_true', help='per-token normalised targets (as MAE)')
    p.add_argument('--cos_loss', action='store_true', help='1 - cosine similarity instead of MSE')
    p.add_argument('--loss_reduction', default='batch', choices=LOSS_REDUCTIONS,
                   help='batch (the original release\'s): the mean over all masked tokens of the global batch, '
                        'so a long window weighs more than a short one; video: the mean over videos of each '
                        'video\'s mean over its masked tokens')

    # optimizer
    p.add_argument('--weight_decay', default=0.05, type=float)
    p.add_argument('--lr', default=None, type=float, help='absolute learning rate (default: blr * global batch / 256)')
    p.add_argument('--blr', default=1e-3, type=float,
                   help='base learning rate; 1e-3 is the original release\'s default (the paper\'s text states '
                        '1.5e-4)')
    p.add_argument('--min_lr', default=0.0, type=float, help='end of the cosine schedule')
    p.add_argument('--warmup_epochs', default=40, type=int)
    p.add_argument('--clip_grad', default=None, type=float, help='clip the gradient norm to this value')
    p.add_argument('--fp16', action='store_true',
                   help='fp16 autocast with a GradScaler on GPU, as the original release trained (default: bf16 '
                        'autocast on GPU, fp32 on CPU)')
    p.add_argument('--pad_multiple', default=0, type=int,
                   help='pad each batch (and the encoder\'s visible tokens) to a multiple of this many segments; '
                        'results are equal up to float rounding, GPU kernels are faster with few distinct shapes. 0: 32 on GPU, 1 on '
                        'CPU (docs/BENCHMARKS.md)')
    p.add_argument('--cudnn_sdp', action='store_true',
                   help='let attention use the cuDNN kernel on GPU (off by default: it plans every new sequence '
                        'length anew, measured 2x slower on varying windows)')

    # data
    p.add_argument('--data_path', default=['data'], nargs='+',
                   help='dataset CSV(s), or folder(s) holding <dataset>.csv')
    p.add_argument('--dataset', default='combined', help='CSV name looked up in a --data_path folder')
    p.add_argument('--val_data_path', default=None, help='validation CSV (optional)')
    p.add_argument('--segment_sec', default=5.0, type=float,
                   help='segment length the embeddings were made with (recorded in the checkpoint; windows are '
                        'drawn in segments, randint(10, num_patches * 5) // 5, as released)')
    p.add_argument('--skip_bad', action='store_true',
                   help='check every video at start; skip (and report) missing/unreadable/NaN/wrong-size ones')
    p.add_argument('--num_workers', default=8, type=int)
    p.add_argument('--pin_mem', action='store_true')

    # run
    p.add_argument('--output_dir', default='./output_dir', help='checkpoints and log.txt')
    p.add_argument('--log_dir', default=None, help='TensorBoard folder (default: --output_dir)')
    p.add_argument('--save_every', default=10, type=int, help='checkpoint every N epochs (and at the end)')
    p.add_argument('--eval_every', default=5, type=int, help='validation loss every N epochs (and at the end)')
    p.add_argument('--print_freq', default=20, type=int, help='steps between log lines')
    p.add_argument('--resume', default='', help='checkpoint to resume from')
    p.add_argument('--trust_checkpoint', action='store_true',
                   help='allow full unpickling of the --resume checkpoint when it holds Python objects that safe '
                        'loading refuses (this can run code from the file: only for files you trust); never '
                        'applies to a checkpoint found by auto-resume')
    p.add_argument('--no_auto_resume', action='store_true',
                   help='do not resume from the newest checkpoint-*.pth in --output_dir')
    p.add_argument('--start_epoch', default=0, type=int)
    p.add_argument('--seed', default=0, type=int)
    p.add_argument('--device', default='auto',
                   help='auto (cuda:$LOCAL_RANK under torchrun, else cuda when available, else cpu), cpu, cuda or cuda:N')
    p.add_argument('--distributed', action='store_true',
                   help='accepted for the original command line; torchrun\'s environment decides')
    p.add_argument('--world_size', default=None, type=int,
                   help='optional check: must equal the number of processes torchrun started')
    return p


def csv_paths(args):
    paths = []
    for p in args.data_path:
        path = os.path.join(p, args.dataset + '.csv') if os.path.isdir(p) else p
        if not os.path.isfile(path):
            raise InputError(f'--data_path: {path} not found (give a CSV file or a folder holding {args.dataset}.csv)')
        paths.append(path)
    return paths


def train_sampler(dataset, args):
    """This process's share of each epoch's shuffled videos. ``drop_last``: the processes share the first
    ``world_size * (N // world_size)`` videos of the epoch's permutation instead of padding it with repeated
    videos, so that N processes with batch B take the steps of one process with batch N * B (the same
    videos, as many steps); with padding they could take one step more, holding repeated videos."""
    return torch.utils.data.DistributedSampler(dataset, num_replicas=args.world_size, rank=args.rank,
                                               shuffle=True, seed=args.seed, drop_last=True)


def check_args(args):
    """Every numeric flag in its range, with argparse-style messages (``argument --x: ...``)."""
    def need(ok, flag, what):
        if not ok:
            raise InputError(f'argument --{flag}: {what}, got {getattr(args, flag)}')
    need(0 < args.mask_ratio < 1, 'mask_ratio', 'must be between 0 and 1 (both excluded)')
    for flag in ('batch_size', 'epochs', 'accum_iter', 'save_every', 'eval_every', 'print_freq', 'input_size',
                 'depth', 'num_heads', 'decoder_embed_dim', 'decoder_depth', 'decoder_num_heads'):
        need(getattr(args, flag) >= 1, flag, 'must be at least 1')
    need(args.num_patches >= 2, 'num_patches', 'must be at least 2 (a window has 2 to num_patches segments)')
    for flag in ('embed_dim', 'max_steps_per_epoch', 'world_size'):
        need(getattr(args, flag) is None or getattr(args, flag) >= 1, flag, 'must be at least 1')
    for flag in ('warmup_epochs', 'start_epoch', 'num_workers', 'weight_decay', 'min_lr', 'pad_multiple'):
        need(getattr(args, flag) >= 0, flag, 'must not be negative')
    for flag in ('blr', 'mlp_ratio', 'segment_sec'):
        need(getattr(args, flag) > 0, flag, 'must be positive')
    for flag in ('lr', 'clip_grad'):
        need(getattr(args, flag) is None or getattr(args, flag) > 0, flag, 'must be positive')
    width = args.embed_dim or args.input_size
    need(width % 2 == 0, 'embed_dim' if args.embed_dim else 'input_size',
         'the encoder width must be even (sin-cos position embeddings)')
    need(args.decoder_embed_dim % 2 == 0, 'decoder_embed_dim', 'must be even (sin-cos position embeddings)')
    need(width % args.num_heads == 0, 'num_heads', f'must divide the encoder width {width}')
    need(args.decoder_embed_dim % args.decoder_num_heads == 0, 'decoder_num_heads',
         f'must divide --decoder_embed_dim {args.decoder_embed_dim}')


def main(args):
    check_args(args)
    misc.init_distributed_mode(args)
    lock = None
    if misc.is_main_process():   # one run per output folder: a second one stops here
        lock = FolderLock(args.output_dir, 'pretraining run')
    try:
        train(args)
    finally:
        if lock is not None:
            lock.release()


def train(args):
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    if not args.pad_multiple:
        args.pad_multiple = 32 if device.type == 'cuda' else 1
    if device.type == 'cuda' and not args.cudnn_sdp:
        torch.backends.cuda.enable_cudnn_sdp(False)
    print('args:', json.dumps(vars(args), default=str))

    kw = dict(input_size=args.input_size, num_patches=args.num_patches, mask_ratio=args.mask_ratio,
              seed=args.seed, skip_bad=args.skip_bad, pad_multiple=args.pad_multiple)
    dataset_train = PretrainDataset(csv_paths(args), train=True, **kw)
    sampler = train_sampler(dataset_train, args)
    loader_kw = dict(batch_size=args.batch_size, num_workers=args.num_workers, pin_memory=args.pin_mem,
                     collate_fn=collate_built)   # the dataset builds each batch (__getitems__)
    loader_train = torch.utils.data.DataLoader(dataset_train, sampler=sampler, drop_last=True, **loader_kw)
    if len(loader_train) == 0:
        raise InputError(f'{len(dataset_train)} videos do not fill one step of batch_size {args.batch_size} '
                         f'x {args.world_size} process(es)')
    loader_val = None
    if args.val_data_path:
        dataset_val = PretrainDataset(args.val_data_path, train=False, **kw)
        shard = torch.utils.data.Subset(dataset_val, range(args.rank, len(dataset_val), args.world_size))
        loader_val = torch.utils.data.DataLoader(shard, shuffle=False, **loader_kw)
    print(f'train: {len(dataset_train)} videos, {len(loader_train)} steps per epoch'
          + (f'; val: {len(dataset_val)} videos' if loader_val else ''))

    model = LVMAE(num_patches=args.num_patches, input_size=args.input_size, depth=args.depth,
                  num_heads=args.num_heads, decoder_embed_dim=args.decoder_embed_dim,
                  decoder_depth=args.decoder_depth, decoder_num_heads=args.decoder_num_heads,
                  mlp_ratio=args.mlp_ratio, norm_pix_loss=args.norm_pix_loss, cos_loss=args.cos_loss,
                  embed_dim=args.embed_dim, input_scale=args.input_scale,
                  loss_reduction=args.loss_reduction).to(device)
    args.input_scale = model.input_scale     # 'auto' resolved: the checkpoint's args hold the number
    model.pad_multiple = args.pad_multiple
    model_without_ddp = model
    n_parameters = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f'model: {n_parameters / 1e6:.2f}M trainable parameters')

    eff_batch_size = args.batch_size * args.accum_iter * args.world_size
    if args.lr is None:
        args.lr = args.blr * eff_batch_size / 256
    print(f'global batch {eff_batch_size}, lr {args.lr:.3e} (blr {args.blr:.3e})')

    if args.distributed:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[args.gpu] if device.type == 'cuda' else None)
    optimizer = torch.optim.AdamW(param_groups(model_without_ddp, args.weight_decay), lr=args.lr, betas=(0.9, 0.95), fused=True)
    if args.fp16 and device.type != 'cuda':
        print('--fp16 is for GPUs; training in fp32 on CPU')
    scaler = torch.amp.GradScaler('cuda', enabled=args.fp16 and device.type == 'cuda')
    start_flag = args.start_epoch   # what the checkpoints record, also after resuming (at another epoch)
    misc.resume(args, model_without_ddp, optimizer, scaler, arch_keys=ARCH_KEYS + ENCODER_KEYS)

    log_writer = None
    if misc.is_main_process():   # the folder is locked: no other run writes these files
        misc.sweep_stale_tmp(args.output_dir)
        misc.trim_log(args.output_dir, args.start_epoch)
        from torch.utils.tensorboard import SummaryWriter
        log_writer = SummaryWriter(log_dir=args.log_dir or args.output_dir)

    if args.start_epoch >= args.epochs:
        print(f'nothing to do: epochs 0 to {args.start_epoch - 1} are done (raise --epochs to train longer)')
    else:
        print(f'training epochs {args.start_epoch} to {args.epochs - 1}')
    trivial = None
    if loader_val is not None and args.start_epoch < args.epochs:
        trivial = trivial_losses(model_without_ddp, loader_val, device, args)
        print(f'validation masks: loss of predicting the mean embedding {trivial["mean"]:.5f}, of copying the '
              f'nearest visible segment {trivial["copy"]:.5f} (the model\'s validation loss should go below both)')
    start_time = time.time()
    for epoch in range(args.start_epoch, args.epochs):
        sampler.set_epoch(epoch)
        dataset_train.set_epoch(epoch)
        train_stats = train_one_epoch(model, loader_train, optimizer, device, epoch, scaler, args, log_writer)
        log_stats = {**{f'train_{k}': v for k, v in train_stats.items()}, 'epoch': epoch,
                     'n_parameters': n_parameters}
        last = epoch + 1 == args.epochs
        if loader_val is not None and ((epoch + 1) % args.eval_every == 0 or last):
            val = evaluate(model_without_ddp, loader_val, device, args)
            val.update({'loss_mean_prediction': trivial['mean'], 'loss_copy_nearest': trivial['copy']})
            log_stats.update({f'val_{k}': v for k, v in val.items()})
            log_stats['val_loss_reduction'] = args.loss_reduction
            print(f'epoch {epoch}: validation loss {val["loss"]:.5f} ({VAL_LOSS_MEANING[args.loss_reduction]}; '
                  f'mean embedding {trivial["mean"]:.5f}, copy nearest {trivial["copy"]:.5f}); masked segments '
                  f'retrieved top-1 {val["retrieval_top1"]:.1f} %, mean rank {val["retrieval_rank"]:.3f} (random 0.5)')
            if log_writer is not None:
                for k, v in val.items():
                    log_writer.add_scalar('val_' + k, v, epoch)
        if misc.is_main_process():
            log_writer.flush()
            with open(os.path.join(args.output_dir, 'log.txt'), 'a') as f:
                f.write(json.dumps(log_stats) + '\n')
        if (epoch + 1) % args.save_every == 0 or last:
            misc.save_model(args, epoch, model_without_ddp, optimizer, scaler, start_epoch=start_flag)

    print(f'training time {datetime.timedelta(seconds=int(time.time() - start_time))}')
    if log_writer is not None:
        log_writer.close()
    if misc.is_dist():
        torch.distributed.destroy_process_group()


if __name__ == '__main__':
    run_main(main, get_args_parser().parse_args())
