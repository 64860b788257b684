"""Per-iteration learning rate: linear warmup, then half-cycle cosine down to ``min_lr`` (as MAE)."""
import math


def lr_at(epoch, args):
    """Learning rate at a fractional ``epoch`` (epoch + step / steps_per_epoch)."""
    if epoch < args.warmup_epochs:
        return args.lr * epoch / args.warmup_epochs
    progress = (epoch - args.warmup_epochs) / max(args.epochs - args.warmup_epochs, 1e-8)
    return args.min_lr + (args.lr - args.min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def adjust_learning_rate(optimizer, epoch, args):
    lr = lr_at(epoch, args)
    for group in optimizer.param_groups:
        group['lr'] = lr
    return lr
