"""Write real video files with PyAV (FFmpeg ships inside the wheel): used by the tests, the demo
benchmark generator and the benchmarks, never by the pipeline itself."""
from fractions import Fraction

import av
import numpy as np


def write_video(path, frames, fps=10, codec='libx264', pix_fmt='yuv420p', gop=None, options=None, format=None):
    """Encode ``frames`` (an iterable of ``[H, W, 3]`` uint8 RGB arrays; H and W even) to ``path``
    (``options``: encoder options, e.g. ``{'threads': '1'}``; ``format``: container when the name has no
    extension). Returns the number of frames written."""
    n = 0
    with av.open(str(path), mode='w', format=format) as container:
        stream = None
        for frame in frames:
            if stream is None:
                h, w = frame.shape[:2]
                stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1000), options=options)
                stream.width, stream.height, stream.pix_fmt = w, h, pix_fmt
                if gop:
                    stream.codec_context.gop_size = gop
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format='rgb24')):
                container.mux(packet)
            n += 1
        if stream is not None:
            for packet in stream.encode():
                container.mux(packet)
    return n


def color_frames(seconds, fps=10, size=(64, 48), colors=((255, 0, 0), (0, 255, 0), (0, 0, 255)),
                 change_every=5.0, seed=0):
    """Frames of a plain test video: a flat colour that changes every ``change_every`` seconds,
    plus a little seeded noise so that the encoder has something to compress."""
    rng = np.random.default_rng(seed)
    w, h = size
    for i in range(int(round(seconds * fps))):
        c = np.array(colors[int(i / fps // change_every) % len(colors)], dtype=np.int16)
        frame = c + rng.integers(-8, 9, size=(h, w, 3), dtype=np.int16)
        yield np.clip(frame, 0, 255).astype(np.uint8)
