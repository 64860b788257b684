"""Generated sequences of segment embeddings whose class is the ORDER of their scenes ("plots").

Used by the learning test and the measurements of docs/PRETRAIN.md; pure numpy, no video. A data set
has ``num_scenes`` scene embeddings (unit-norm, anisotropic as real ones are: a shared direction plus a
scene-specific part) and ``num_plots`` plots, each a cyclic order of all the scenes. A video of plot p
starts at a random scene of p's cycle and follows it, each scene lasting ``min_scene`` to ``max_scene``
segments; a segment is its scene's embedding plus noise, re-normalised. Every plot visits every scene
equally often, so scene frequencies say almost nothing about the plot: a mean over segments cannot
tell the classes apart, while which scene follows which does.
"""
import numpy as np


def scene_embeddings(num_scenes, dim, rng, shared=1.0):
    """``[num_scenes, dim]`` unit vectors: ``shared`` times a common unit direction plus a unit random part."""
    common = rng.standard_normal(dim)
    common /= np.linalg.norm(common)
    own = rng.standard_normal((num_scenes, dim))
    own /= np.linalg.norm(own, axis=1, keepdims=True)
    v = shared * common + own
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def make_plots(num_plots, num_scenes, rng):
    """``num_plots`` different cyclic orders of the scenes (as lists of scene indices)."""
    plots = []
    while len(plots) < num_plots:
        p = [0] + list(1 + rng.permutation(num_scenes - 1))       # cycles start at scene 0: no rotations
        if p not in plots:
            plots.append(p)
    return plots


def plot_video(plot, scenes, length, rng, min_scene=2, max_scene=4, noise=0.3):
    """``[length, dim]`` float32 unit-norm segments following ``plot`` from a random scene."""
    k = int(rng.integers(len(plot)))
    order = []
    while len(order) < length:
        order += [plot[k % len(plot)]] * int(rng.integers(min_scene, max_scene + 1))
        k += 1
    x = scenes[order[:length]] + noise * rng.standard_normal((length, scenes.shape[1])) / np.sqrt(scenes.shape[1])
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


class PlotData:
    """A generated data set: ``videos(n, seed)`` returns ``(list of [L, dim] arrays, labels [n])``,
    labels cycling over the plots (balanced), lengths uniform in ``[min_len, max_len]``."""

    def __init__(self, dim=32, num_scenes=8, num_plots=3, min_len=24, max_len=48, seed=0, shared=1.0, **video_kw):
        rng = np.random.default_rng(seed)
        self.scenes = scene_embeddings(num_scenes, dim, rng, shared)
        self.plots = make_plots(num_plots, num_scenes, rng)
        self.min_len, self.max_len, self.video_kw = min_len, max_len, video_kw

    def videos(self, n, seed):
        rng = np.random.default_rng(seed)
        labels = np.arange(n) % len(self.plots)
        xs = [plot_video(self.plots[y], self.scenes, int(rng.integers(self.min_len, self.max_len + 1)), rng,
                         **self.video_kw) for y in labels]
        return xs, labels
