"""Pretraining learns long-range context (pure torch, generated sequences, no video).

Sequences of segment embeddings follow one of three "plots" (cyclic orders of the same 8 scenes,
util/plot_sequences.py): pooling cannot tell the plots apart, only the order of scenes can. A few
hundred steps of a tiny LV-MAE must bring an attentive probe on its frozen encoder clearly above the
same probe on the untrained encoder (the same architecture and initialisation). The check must fail
when pretraining is broken: the parametrised negative cases break it on purpose (the encoder's visible
tokens get shuffled positions; the decoder sees the masked tokens' values) and assert that the gap
disappears, so the threshold is shown to separate working from broken pretraining (measured on a
2-core CPU: working 95.3 % against 48.7 % untrained; shuffled positions 59.3 %). Chance is 33.3 %.
The negative cases are marked slow (about 40 s each).
"""
import importlib.util
import os

import pytest
import torch

from models_lvmae import LVMAE
from util.plot_sequences import PlotData

spec = importlib.util.spec_from_file_location(
    'bench_learning', os.path.join(os.path.dirname(__file__), '..', 'bench', 'bench_learning.py'))
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)

STEPS = 800
GAP = 20  # points of probe accuracy that pretraining must add (3 balanced classes, 150 test videos)


pytestmark = pytest.mark.usefixtures('one_thread')


def shuffled_positions(monkeypatch):
    """The encoder's visible tokens get the positions of other visible tokens of their video."""
    encode = LVMAE._encode

    def wrong(self, tokens, positions, token_valid):
        g = torch.Generator().manual_seed(int(positions.sum()))
        noise = torch.rand(positions.shape, generator=g).masked_fill(~token_valid, 2.0)
        perm = noise.argsort(1)              # a permutation of the real tokens (padding stays last)
        return encode(self, tokens, positions.gather(1, perm), token_valid)
    monkeypatch.setattr(LVMAE, '_encode', wrong)


def decoder_sees_masked(monkeypatch):
    """The decoder gets each masked token's true embedding added to its mask token (the encoder still
    sees only the visible tokens): the decoder can copy instead of needing the encoder's context."""
    forward, forward_decoder = LVMAE.forward, LVMAE.forward_decoder

    def leaky_forward(self, x, *args, **kw):
        self._leak = x
        return forward(self, x, *args, **kw)

    def leaky_decoder(self, latent, keep, valid):             # forward_decoder plus the leak
        B, L = keep.shape
        y = self.decoder_embed(latent)
        slot = (keep.long().cumsum(1) - 1).clamp(min=0)
        placed = torch.gather(y[:, 1:], 1, slot[..., None].expand(-1, -1, y.shape[-1]))
        full = torch.where(keep[..., None], placed, self.mask_token + self._leak)  # widths equal here
        z = torch.cat([y[:, :1], full], dim=1) + self.decoder_pos_embed[:, :L + 1]
        attn_mask = torch.nn.functional.pad(valid, (1, 0), value=True)[:, None, None, :]
        for blk in self.decoder_blocks:
            z = blk(z, attn_mask=attn_mask)
        return self.decoder_pred(self.decoder_norm(z))[:, 1:]
    monkeypatch.setattr(LVMAE, 'forward', leaky_forward)
    monkeypatch.setattr(LVMAE, 'forward_decoder', leaky_decoder)


@pytest.mark.parametrize('breakage', [None, pytest.param(shuffled_positions, marks=pytest.mark.slow),
                                      pytest.param(decoder_sees_masked, marks=pytest.mark.slow)])
def test_pretraining_beats_the_untrained_encoder(breakage, monkeypatch):
    data = PlotData(dim=32, min_len=16, max_len=32, shared=0.5, noise=0.15, min_scene=3, max_scene=5)
    unlabelled = data.videos(400, 100)[0]
    train, test = data.videos(150, 101), data.videos(150, 102)
    model = bench.build(32, 'release', seed=0)
    untrained = bench.ap_probe(model.eval(), train, test)
    with monkeypatch.context() as m:
        if breakage is not None:
            breakage(m)
        bench.pretrain(model, unlabelled, steps=STEPS, batch_size=16, lr=3e-3)
    pretrained = bench.ap_probe(model, train, test)
    print(f'{getattr(breakage, "__name__", "working")}: AP {pretrained:.1f} % pretrained, {untrained:.1f} % untrained')
    if breakage is None:
        assert pretrained >= untrained + GAP, (pretrained, untrained)
    else:   # the same check would fail: broken pretraining adds (almost) nothing
        assert pretrained < untrained + GAP, (breakage.__name__, pretrained, untrained)
