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


def _masks(model, x, lengths, noise, args):
    """The validation masks of a batch (fixed by the dataset's noise) and the real-token mask."""
    valid = model.valid_mask(lengths, x.shape[1])
    mask = model.make_mask(x, lengths, args.mask_ratio, semantic_arg(args), noise) & valid
    return mask, valid


@torch.no_grad()
def evaluate(model, data_loader, device, args):
    """Validation: ``{'loss', 'retrieval_top1', 'retrieval_rank'}``.

    loss: mean over the validation videos of each video's masked-token loss; the masks are fixed by
    the dataset's noise, so every evaluation uses the same ones. retrieval: each masked segment's
    reconstruction is compared (cosine) with every real segment of its validation batch; top1 is the
    % of masked segments whose own embedding is the most similar, rank the mean rank of the own
    embedding divided by the number of other candidates (0 best, about 0.5 for a random guess). The
    loss can sit at the level of predicting the mean embedding while the encoder learns (see
    docs/PRETRAIN.md); retrieval does not hide that. ``data_loader`` may hold a shard of the videos per
    process: sums are reduced over processes (retrieval candidates are the batch's, so its value
    depends on the validation batch size and the number of processes)."""
    model.eval()
    total, count, top1, rank, n_masked = 0.0, 0, 0.0, 0.0, 0
    for x, lengths, noise in data_loader:
        x, lengths, noise = (t.to(device, non_blocking=True) for t in (x, lengths, noise))
        mask, valid = _masks(model, x, lengths, noise, args)
        with autocast(device, args):
            _, pred, _ = model(x, lengths, mask=mask)
        per_video = model.forward_loss(x, pred, mask, reduction='none')
        total += per_video.double().sum().item()
        count += per_video.shape[0]
        ranks = retrieval_ranks(x, pred, mask, valid)
        top1 += (ranks == 0).sum().item()
        rank += (ranks.double() / max(int(valid.sum()) - 1, 1)).sum().item()
        n_masked += ranks.numel()
    total, count, top1, rank, n_masked = misc.all_reduce_sum([total, count, top1, rank, n_masked], device)
    return {'loss': total / max(count, 1), 'retrieval_top1': 100 * top1 / max(n_masked, 1),
            'retrieval_rank': rank / max(n_masked, 1)}


@torch.no_grad()
def trivial_losses(model, data_loader, device, args):
    """Losses of trivial answers on the validation masks, scored with the model's ``forward_loss`` as
    ``evaluate`` scores the model: ``mean`` predicts the mean embedding of the validation set's real
    tokens everywhere, ``copy`` copies the nearest visible segment of the same video. A model whose
    validation loss is not below both has learned nothing the trivial answers do not know."""
    model.eval()
    sum_x, n_tok = torch.zeros(model.input_size, dtype=torch.float64, device=device), 0
    for x, lengths, _ in data_loader:
        x, lengths = x.to(device).double(), lengths.to(device)
        sum_x += (x * model.valid_mask(lengths, x.shape[1])[..., None]).sum((0, 1))
        n_tok += int(lengths.sum())
    sums = misc.all_reduce_sum(sum_x.tolist() + [n_tok], device)
    mean = torch.tensor(sums[:-1], dtype=torch.float32, device=device) / max(sums[-1], 1)
    totals = {'mean': 0.0, 'copy': 0.0}
    count = 0
    for x, lengths, noise in data_loader:
        x, lengths, noise = (t.to(device, non_blocking=True) for t in (x, lengths, noise))
        mask, valid = _masks(model, x, lengths, noise, args)
        for name, pred in (('mean', mean_prediction(x, mean)), ('copy', copy_nearest_visible(x, mask, valid))):
            totals[name] += model.forward_loss(x, pred, mask, reduction='none').double().sum().item()
        count += x.shape[0]
    mean_loss, copy_loss, count = misc.all_reduce_sum([totals['mean'], totals['copy'], count], device)
    return {'mean': mean_loss / max(count, 1), 'copy': copy_loss / max(count, 1)}
