"""One pretraining epoch, the validation loss and diagnostics (as MAE's engine_pretrain.py)."""
import contextlib
import math

import torch

import util.misc as misc
import util.lr_sched as lr_sched
from util.reconstruction import copy_nearest_visible, mean_prediction, retrieval_ranks


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


def _masks(model, x, lengths, noise, args):
    """The validation masks of a batch (fixed by the dataset's noise) and the real-token mask."""
    valid = model.valid_mask(lengths, x.shape[1])
    mask = model.make_mask(x, lengths, args.mask_ratio, semantic_arg(args), noise) & valid
    return mask, valid


def _loss_sums(model, x, pred, mask):
    """``[masked-token loss sum, masked count, sum of per-video means, videos]`` of one batch."""
    s, n = model.forward_loss(x, pred, mask, reduction='sum')
    per_video = model.forward_loss(x, pred, mask, reduction='none')
    return [s.double().item(), n.item(), per_video.double().sum().item(), per_video.shape[0]]


def _reduce(model, sums):
    """The loss over a whole set from the summed ``_loss_sums``, with the model's reduction."""
    total, count, video_total, videos = sums
    return video_total / max(videos, 1) if model.loss_reduction == 'video' else total / max(count, 1)


@torch.no_grad()
def evaluate(model, data_loader, device, args):
    """Validation: ``{'loss', 'retrieval_top1', 'retrieval_rank'}``.

    loss: with the training's reduction (``model.loss_reduction``) over the whole validation set:
    'batch', the mean over all masked tokens of all validation videos; 'video', the mean over the
    videos of each one's mean. The masks are fixed by the dataset's noise, so every evaluation uses the
    same ones. retrieval: each masked segment's reconstruction is compared (cosine) with every real
    segment of its validation batch (as the model's targets, ``model.loss_target``); top1 is the % of
    masked segments whose own embedding is the most similar, rank the mean rank of the own embedding
    divided by the number of other candidates (0 best, about 0.5 for a random guess). The loss can sit
    at the level of predicting the mean embedding while the encoder learns (see docs/PRETRAIN.md);
    retrieval does not hide that. ``data_loader`` may hold a
    shard of the videos per process: sums are reduced over processes (retrieval candidates are the
    batch's, so its value depends on the validation batch size and the number of processes)."""
    model.eval()
    acc, top1, rank, n_masked = [0.0] * 4, 0.0, 0.0, 0
    for x, lengths, noise in data_loader:
        x, lengths, noise = (t.to(device, non_blocking=True) for t in (x, lengths, noise))
        mask, valid = _masks(model, x, lengths, noise, args)
        with autocast(device, args):
            _, pred, _ = model(x, lengths, mask=mask)
        acc = [a + b for a, b in zip(acc, _loss_sums(model, x, pred, mask))]
        ranks = retrieval_ranks(model.loss_target(x), pred, mask, valid)
        top1 += (ranks == 0).sum().item()
        rank += (ranks.double() / max(int(valid.sum()) - 1, 1)).sum().item()
        n_masked += ranks.numel()
    *acc, top1, rank, n_masked = misc.all_reduce_sum(acc + [top1, rank, n_masked], device)
    return {'loss': _reduce(model, acc), 'retrieval_top1': 100 * top1 / max(n_masked, 1),
            'retrieval_rank': rank / max(n_masked, 1)}


@torch.no_grad()
def trivial_losses(model, data_loader, device, args):
    """Losses of trivial answers on the validation masks, scored with the model's ``forward_loss`` as
    ``evaluate`` scores the model: ``mean`` predicts the mean embedding of the validation set's real
    tokens everywhere, ``copy`` copies the nearest visible segment of the same video; both with the
    model's loss reduction, and both in the space the model predicts (``model.loss_target``: the
    per-token normalised embeddings with ``norm_pix_loss``). A model whose validation loss is not below
    both has learned nothing the trivial answers do not know."""
    model.eval()
    sum_x, n_tok = torch.zeros(model.input_size, dtype=torch.float64, device=device), 0
    for x, lengths, _ in data_loader:
        x, lengths = model.loss_target(x.to(device).double()), lengths.to(device)
        sum_x += (x * model.valid_mask(lengths, x.shape[1])[..., None]).sum((0, 1))
        n_tok += int(lengths.sum())
    sums = misc.all_reduce_sum(sum_x.tolist() + [n_tok], device)
    mean = torch.tensor(sums[:-1], dtype=torch.float32, device=device) / max(sums[-1], 1)
    sums = {'mean': [0.0] * 4, 'copy': [0.0] * 4}
    for x, lengths, noise in data_loader:
        x, lengths, noise = (t.to(device, non_blocking=True) for t in (x, lengths, noise))
        mask, valid = _masks(model, x, lengths, noise, args)
        target = model.loss_target(x)
        for name, pred in (('mean', mean_prediction(target, mean)),
                           ('copy', copy_nearest_visible(target, mask, valid))):
            sums[name] = [a + b for a, b in zip(sums[name], _loss_sums(model, x, pred, mask))]
    return {name: _reduce(model, misc.all_reduce_sum(v, device)) for name, v in sums.items()}
