"""A picture of what a pretrained LV-MAE reconstructs, for one video.

    python tools/visualize_reconstruction.py --resume CKPT --embedding_path FILE.safetensors \
        [--masking random|semantic] [--mask_ratio R] [--seed S] --out PNG

The video's segments (the first ``num_patches`` of a longer video) are masked as in pretraining and
the full model (encoder and decoder) reconstructs them. The picture shows (a) the segment-to-segment
cosine similarity of the video, (b) which segments are visible and which masked, (c) per segment the
cosine between the reconstruction and the original, beside the trivial answer of copying the nearest
visible segment, and (d) for each masked segment the retrieval rank of its reconstruction among the
video's own segments (0: the true segment is the most similar one). The summary numbers are printed
as one JSON line. The same seed gives the same masks, numbers and picture.
"""
import argparse
import json
import os

import matplotlib
matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.colors import ListedColormap  # noqa: E402
from matplotlib.ticker import FuncFormatter  # noqa: E402
from mpl_toolkits.axes_grid1 import make_axes_locatable  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from models_lvmae import LVMAE, SEMANTIC_ORDERS  # noqa: E402
from util.checkpoint import checkpoint_args, load_checkpoint, load_model_state, model_state, resolve_arch  # noqa: E402
from util.embeddings import load_video_embeddings, read_metadata  # noqa: E402
from util.errors import InputError, run_main  # noqa: E402
from util.fileio import atomic_write  # noqa: E402
from util.misc import default_device  # noqa: E402
from util.reconstruction import copy_nearest_visible, retrieval_ranks  # noqa: E402

def get_args_parser():
    p = argparse.ArgumentParser(description='Picture of what a pretrained LV-MAE reconstructs for one video')
    p.add_argument('--resume', required=True, help='pretraining checkpoint (checkpoint-<epoch>.pth, with decoder)')
    p.add_argument('--embedding_path', required=True, help="the video's embedding store file (.safetensors)")
    p.add_argument('--out', required=True, help='PNG written')
    p.add_argument('--masking', choices=['random', 'semantic'], default=None,
                   help="default: the checkpoint's (semantic if it was trained with --masking_strategy)")
    p.add_argument('--semantic_order', choices=SEMANTIC_ORDERS, default=None,
                   help="with semantic masking (default: the checkpoint's, else keep_changes)")
    p.add_argument('--mask_ratio', type=float, default=None, help="default: the checkpoint's, else 0.5")
    p.add_argument('--seed', type=int, default=0, help='random masking noise')
    p.add_argument('--num_heads', type=int, default=None,
                   help='encoder heads, for a checkpoint that does not store its args (default 16)')
    p.add_argument('--decoder_num_heads', type=int, default=None,
                   help='decoder heads, for a checkpoint that does not store its args (default 16)')
    p.add_argument('--device', default='auto',
                   help='auto (cuda:$LOCAL_RANK under torchrun, else cuda when available, else cpu), cpu, cuda or cuda:N')
    return p


# ---------------------------------------------------------------------------------------- model
def load_model(path, heads=None):
    """The full LV-MAE (encoder and decoder) of a checkpoint, in eval mode: ``(model, ckpt_args, epoch)``."""
    try:
        ckpt = load_checkpoint(path)
    except (FileNotFoundError, RuntimeError) as e:
        raise InputError(str(e)) from None
    sd = model_state(ckpt)
    if 'decoder_pred.weight' not in sd:
        raise InputError(f'{path}: no decoder in this checkpoint; the reconstruction needs the pretraining '
                         f'checkpoint (encoder and decoder)')
    ckpt_args = checkpoint_args(ckpt)
    try:
        cfg, notes = resolve_arch(ckpt_args, sd, heads, source=path)
        for key in notes:
            print(f'{path}: {key} not stored in the checkpoint: using {cfg[key]} (set --{key})')
        model = LVMAE(**cfg)
        load_model_state(model, sd, path, strict=True)
    except (RuntimeError, ValueError, AssertionError) as e:
        if isinstance(e, InputError):
            raise
        raise InputError(str(e)) from None
    return model.eval().requires_grad_(False), ckpt_args, ckpt.get('epoch')


# ---------------------------------------------------------------------------------------- numbers
def cosine(a, b):
    return F.cosine_similarity(a.float(), b.float(), dim=-1)


@torch.no_grad()
def reconstruct(model, emb, mask_ratio, semantic, seed, device='cpu'):
    """Mask one video ``emb [L, D]`` and reconstruct it. Returns a dict of per-segment arrays:
    ``masked [L]`` bool, ``cos_model`` / ``cos_copy`` [L], ``rank_model`` / ``rank_copy`` [M] (one per
    masked segment, in time order), ``sim [L, L]``."""
    model = model.to(device)
    x = emb[None].to(device)
    L = emb.shape[0]
    lengths = torch.tensor([L], device=device)
    valid = torch.ones(1, L, dtype=torch.bool, device=device)
    noise = None if semantic else torch.rand(1, L, generator=torch.Generator().manual_seed(seed))
    mask = model.make_mask(x, lengths, mask_ratio, semantic=semantic, noise=noise)
    _, pred, mask = model(x, lengths, mask=mask)
    mask = mask.bool()
    target = model.loss_target(x)   # with norm_pix_loss the model predicts per-token normalised embeddings
    copy = copy_nearest_visible(target, mask, valid)
    unit = F.normalize(x[0].float(), dim=-1)
    return dict(
        masked=mask[0].cpu().numpy(),
        cos_model=cosine(pred[0], target[0]).cpu().numpy(),
        cos_copy=cosine(copy[0], target[0]).cpu().numpy(),
        rank_model=retrieval_ranks(target, pred, mask, valid).cpu().numpy(),
        rank_copy=retrieval_ranks(target, copy, mask, valid).cpu().numpy(),
        sim=(unit @ unit.T).cpu().numpy())


def summary(r):
    m = r['masked']
    return dict(masked=int(m.sum()),
                mean_cos_model=float(r['cos_model'][m].mean()), mean_cos_copy=float(r['cos_copy'][m].mean()),
                top1_model=float((r['rank_model'] == 0).mean()), top1_copy=float((r['rank_copy'] == 0).mean()),
                mean_rank_model=float(r['rank_model'].mean()), mean_rank_copy=float(r['rank_copy'].mean()))


# ---------------------------------------------------------------------------------------- picture
MODEL_COLOR, COPY_COLOR, MASK_COLOR, VISIBLE_COLOR = '#1f77b4', '#ff7f0e', '#d62728', '#bbbbbb'


def draw(r, s, title, warning, out):
    masked = r['masked']
    L = len(masked)
    seg = np.arange(L)
    fig = plt.figure(figsize=(15, 7.5))
    grid = fig.add_gridspec(3, 2, width_ratios=[1, 1.55], height_ratios=[0.3, 1.2, 1.2],
                            hspace=0.45, wspace=0.16, left=0.05, right=0.98, top=0.82 if warning else 0.87, bottom=0.08)

    # (a) similarity matrix, with a strip above it marking the masked segments
    ax = fig.add_subplot(grid[:, 0])
    im = ax.imshow(r['sim'], cmap='viridis', vmin=min(0.0, float(r['sim'].min())), vmax=1,
                   interpolation='nearest')
    ax.set_xlabel('segment')
    ax.set_ylabel('segment')
    div = make_axes_locatable(ax)
    top = div.append_axes('top', size='3%', pad=0.05)
    top.imshow(masked[None].astype(int), cmap=ListedColormap([VISIBLE_COLOR, MASK_COLOR]), vmin=0, vmax=1,
               aspect='auto', interpolation='nearest', extent=(-0.5, L - 0.5, 0, 1))
    top.set_xlim(ax.get_xlim())
    top.set_xticks([])
    top.set_yticks([])
    cax = div.append_axes('bottom', size='3%', pad=0.5)
    fig.colorbar(im, cax=cax, orientation='horizontal')
    top.set_title('(a) cosine similarity between segments (strip: masked red, visible grey)', fontsize=10)

    # (b) timeline
    ax_t = fig.add_subplot(grid[0, 1])
    ax_t.bar(seg, np.ones(L), width=1.0, color=np.where(masked, MASK_COLOR, VISIBLE_COLOR), edgecolor='white',
             linewidth=0.5 if L <= 64 else 0)
    ax_t.set_yticks([])
    ax_t.set_xlim(-0.5, L - 0.5)
    ax_t.set_title(f'(b) timeline: {L - s["masked"]} visible (grey), {s["masked"]} masked (red)', fontsize=10)

    # (c) cosine to the original, per segment
    ax_c = fig.add_subplot(grid[1, 1], sharex=ax_t)
    ax_c.axhline(0, color='black', lw=0.5)
    for i in np.flatnonzero(masked):
        ax_c.axvspan(i - 0.5, i + 0.5, color=MASK_COLOR, alpha=0.08, lw=0)
    ms = 4 if L <= 128 else 2
    ax_c.plot(seg, r['cos_copy'], '-', color=COPY_COLOR, lw=1, alpha=0.5)
    ax_c.plot(seg[masked], r['cos_copy'][masked], 's', color=COPY_COLOR, ms=ms,
              label=f'copy nearest visible (masked mean {s["mean_cos_copy"]:.3f})')
    ax_c.plot(seg, r['cos_model'], '-', color=MODEL_COLOR, lw=1, alpha=0.5)
    ax_c.plot(seg[masked], r['cos_model'][masked], 'o', color=MODEL_COLOR, ms=ms,
              label=f'LV-MAE reconstruction (masked mean {s["mean_cos_model"]:.3f})')
    ax_c.set_ylim(min(-0.05, float(min(r['cos_model'].min(), r['cos_copy'].min())) - 0.05), 1.05)
    ax_c.set_ylabel('cosine to original')
    ax_c.set_title('(c) reconstruction vs original, per segment (markers: masked segments; '
                   'copying is exact on visible ones)', fontsize=10)
    ax_c.legend(loc='lower left', fontsize=8, framealpha=0.9)

    # (d) retrieval rank of each masked segment's reconstruction among the video's own segments
    ax_r = fig.add_subplot(grid[2, 1], sharex=ax_t)
    mpos = np.flatnonzero(masked)
    w = 0.4
    ax_r.bar(mpos - w / 2, r['rank_model'] + 0.15, width=w, bottom=-0.15, color=MODEL_COLOR,
             label=f'LV-MAE (top-1 {s["top1_model"]:.0%}, mean rank {s["mean_rank_model"]:.1f})')
    ax_r.bar(mpos + w / 2, r['rank_copy'] + 0.15, width=w, bottom=-0.15, color=COPY_COLOR,
             label=f'copy nearest visible (top-1 {s["top1_copy"]:.0%}, mean rank {s["mean_rank_copy"]:.1f})')
    worst = max(1.0, float(max(r['rank_model'].max(), r['rank_copy'].max())))
    if L > 32:  # long videos: small ranks (the interesting ones) stay readable
        ax_r.set_yscale('symlog', linthresh=1, linscale=0.5)
        ax_r.set_ylim(-0.3, worst * 4)
        ax_r.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f'{v:g}'))
    else:
        ax_r.set_ylim(-0.3, worst * 1.15 + 0.5)
    ax_r.set_ylabel('rank (0 = best)' + (', log scale' if L > 32 else ''))
    ax_r.set_xlabel('segment')
    ax_r.set_title(f'(d) retrieval rank of each masked reconstruction among the video\'s own {L} segments '
                   f'(0 = best)', fontsize=10)
    ax_r.legend(loc='upper left', fontsize=8, framealpha=0.9)
    plt.setp(ax_t.get_xticklabels(), visible=False)
    plt.setp(ax_c.get_xticklabels(), visible=False)

    fig.suptitle(title, fontsize=11, y=0.99)
    if warning:
        fig.text(0.5, 0.9, warning, ha='center', va='center', fontsize=11, color=MASK_COLOR, weight='bold')
    try:
        atomic_write(out, lambda tmp: fig.savefig(tmp, format='png', dpi=100, metadata={'Software': None}))
    finally:
        plt.close(fig)


# ---------------------------------------------------------------------------------------- main
def main(args):
    if args.mask_ratio is not None and not 0 < args.mask_ratio < 1:
        raise InputError(f'--mask_ratio must be between 0 and 1, got {args.mask_ratio}')
    try:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    except OSError as e:
        raise InputError(f'--out {args.out}: cannot create its folder ({e.strerror or e})') from None
    heads = {'num_heads': args.num_heads, 'decoder_num_heads': args.decoder_num_heads}
    model, ckpt_args, epoch = load_model(args.resume, heads)
    masking = args.masking or ('semantic' if ckpt_args.get('masking_strategy') else 'random')
    order = args.semantic_order or ckpt_args.get('semantic_order') or 'keep_changes'
    ratio = args.mask_ratio if args.mask_ratio is not None else ckpt_args.get('mask_ratio', 0.5)

    emb = load_video_embeddings(args.embedding_path, input_size=model.input_size)
    meta = read_metadata(args.embedding_path)
    total = emb.shape[0]
    emb = emb[:model.num_patches]
    L = emb.shape[0]
    if int(L * (1 - ratio)) < 1 or int(L * (1 - ratio)) == L:
        raise InputError(f'{args.embedding_path}: {L} segments at mask ratio {ratio} leave '
                         f'{int(L * (1 - ratio))} visible: nothing to reconstruct from or nothing masked')
    r = reconstruct(model, emb, ratio, order if masking == 'semantic' else False, args.seed, default_device(args.device))
    s = summary(r)

    video = meta.get('video_id') or os.path.splitext(os.path.basename(args.embedding_path))[0]
    random_enc = meta.get('random_init') == '1'
    ckpt_name = os.path.join(os.path.basename(os.path.dirname(os.path.abspath(args.resume))),
                             os.path.basename(args.resume))
    how = f'semantic ({order})' if masking == 'semantic' else f'random (seed {args.seed})'
    length = f'{L} segments' if L == total else f'first {L} of {total} segments (num_patches = {L})'
    title = (f'video {video}: {length}\ncheckpoint {ckpt_name}' + (f' (epoch {epoch})' if epoch is not None else '')
             + f'  |  masking {how}, ratio {ratio:g}'
             + ('  |  targets per-segment normalised (norm_pix_loss)' if model.norm_pix_loss else ''))
    warning = ('RANDOM ENCODER: these embeddings come from a randomly initialised LanguageBind '
               '(a pipeline check, not real video content)') if random_enc else None
    draw(r, s, title, warning, args.out)

    line = dict(video_id=video, checkpoint=args.resume, epoch=epoch, masking=masking,
                semantic_order=order if masking == 'semantic' else None, mask_ratio=ratio, seed=args.seed,
                segments=L, total_segments=total, random_init=random_enc,
                candidates=f"the video's own {L} segments", **s,
                masked_segments=np.flatnonzero(r['masked']).tolist(), out=args.out)
    print(json.dumps(line))
    return line


if __name__ == '__main__':
    run_main(main, get_args_parser().parse_args())
