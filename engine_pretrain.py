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


def param_groups(model, weight_decay):
    """AdamW groups: no weight decay on biases, norms and other 1-D parameters; frozen ones left out."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 or name.endswith('.bias') else decay).append(p)
    return [{'params': no_decay, 'weight_decay': 0.0}, {'params': decay, 'weight_decay': weight_decay}]


def global_batch_loss(loss, mask, device, args):
    """``(loss to back-propagate, loss of the whole step to log)``, the same for any number of processes.

    'batch' reduction: ``loss`` is this process's mean over its masked tokens. The step's loss is the
    mean over the masked tokens of every process's batch; since DistributedDataParallel averages the
    gradients over the processes, each process back-propagates ``its token sum * world size / global
    token count``. 'video': the mean over the videos of the step (every video has masked tokens, and
    every process the same number of videos), which is what averaging the gradients gives."""
    if getattr(args, 'loss_reduction', 'batch') == 'video':
        return loss, misc.all_reduce_mean(loss.item(), device)
    count = mask.sum()
    total, global_count = misc.all_reduce_sum([(loss.detach() * count).item(), count.item()], device)
    global_count = max(global_count, 1.0)
    return loss * (count * misc.get_world_size() / global_count), total / global_count


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
                loss, _, mask = model(x, lengths, mask_ratio=args.mask_ratio, semantic=semantic_arg(args),
                                      noise=noise)
            # loss_value is the same on every process: they all stop together on a non-finite one
            loss, loss_value = global_batch_loss(loss, mask, device, args)
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
    """Validation loss with the training's reduction (``model.loss_reduction``) over the whole
    validation set: 'batch', the mean over all masked tokens of all validation videos; 'video', the
    mean over the videos of each one's mean. The masks are fixed by the dataset's noise, so every
    evaluation uses the same ones. ``data_loader`` may hold a shard of the videos per process: sums are
    reduced over processes."""
    model.eval()
    total, count, video_total, videos = 0.0, 0.0, 0.0, 0
    for x, lengths, noise in data_loader:
        x, lengths, noise = (t.to(device, non_blocking=True) for t in (x, lengths, noise))
        with autocast(device, args):
            _, pred, mask = model(x, lengths, mask_ratio=args.mask_ratio, semantic=semantic_arg(args), noise=noise)
        s, n = model.forward_loss(x, pred, mask, reduction='sum')
        total, count = total + s.double().item(), count + n.item()
        per_video = model.forward_loss(x, pred, mask, reduction='none')
        video_total += per_video.double().sum().item()
        videos += per_video.shape[0]
    total, count, video_total, videos = misc.all_reduce_sum([total, count, video_total, videos], device)
    if model.loss_reduction == 'video':
        return video_total / max(videos, 1)
    return total / max(count, 1)
