"""One pretraining epoch and the validation loss (as MAE's engine_pretrain.py)."""
import contextlib
import math

import torch

import util.misc as misc
import util.lr_sched as lr_sched


def autocast(device, args):
    """bf16 autocast on GPU (fp16 with --fp16), none (fp32) on CPU."""
    if not str(device).startswith('cuda'):
        return contextlib.nullcontext()
    return torch.autocast('cuda', dtype=torch.float16 if args.fp16 else torch.bfloat16)


def semantic_arg(args):
    return args.semantic_order if args.masking_strategy else False


def steps_per_epoch(data_loader, args):
    n = len(data_loader)
    return min(n, args.max_steps_per_epoch) if args.max_steps_per_epoch else n


def train_one_epoch(model, data_loader, optimizer, device, epoch, scaler, args, log_writer=None):
    model.train()
    accum_iter = args.accum_iter
    num_steps = steps_per_epoch(data_loader, args)
    metric_logger = misc.MetricLogger()
    header = f'Epoch: [{epoch}]'
    samples_per_step = args.batch_size * misc.get_world_size()
    optimizer.zero_grad()

    for step, (x, lengths, noise) in enumerate(metric_logger.log_every(
            data_loader, num_steps, args.print_freq, header, samples_per_step)):
        if step % accum_iter == 0:
            lr = lr_sched.adjust_learning_rate(optimizer, epoch + step / num_steps, args)
        x, lengths, noise = (t.to(device, non_blocking=True) for t in (x, lengths, noise))
        update = (step + 1) % accum_iter == 0
        sync = contextlib.nullcontext() if update or not args.distributed else model.no_sync()
        with sync:
            with autocast(device, args):
                loss, _, _ = model(x, lengths, mask_ratio=args.mask_ratio, semantic=semantic_arg(args), noise=noise)
            loss_value = misc.all_reduce_mean(loss.item(), device)   # every process stops together
            if not math.isfinite(loss_value):
                raise FloatingPointError(f'loss is {loss_value} at epoch {epoch} step {step} (lr {lr:.3g}); '
                                         f'stopping. Try a lower --blr/--lr or --clip_grad.')
            scaler.scale(loss / accum_iter).backward()
        if update:
            if args.clip_grad:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad()

        metric_logger.update(loss=loss_value, lr=lr)
        if log_writer is not None and update:
            epoch_1000x = int((epoch + step / num_steps) * 1000)   # x-axis comparable across batch sizes
            log_writer.add_scalar('train_loss', loss_value, epoch_1000x)
            log_writer.add_scalar('lr', lr, epoch_1000x)

    return metric_logger.global_avg()


@torch.no_grad()
def evaluate(model, data_loader, device, args):
    """Mean over the validation videos of each video's masked-token loss; the masks are fixed by the
    dataset's noise, so every evaluation uses the same ones. ``data_loader`` may hold a shard of the
    videos per process: sums are reduced over processes."""
    model.eval()
    total, count = 0.0, 0
    for x, lengths, noise in data_loader:
        x, lengths, noise = (t.to(device, non_blocking=True) for t in (x, lengths, noise))
        with autocast(device, args):
            _, pred, mask = model(x, lengths, mask_ratio=args.mask_ratio, semantic=semantic_arg(args), noise=noise)
        per_video = model.forward_loss(x, pred, mask, reduction='none')
        total += per_video.double().sum().item()
        count += per_video.shape[0]
    total, count = misc.all_reduce_sum([total, count], device)
    return total / max(count, 1)
