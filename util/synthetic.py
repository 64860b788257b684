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


def moving_texture_frames(seconds, fps=30, size=(480, 270), seed=0, grain=0):
    """Frames of a realistic-to-encode test video: a seeded random texture (smooth blobs and fine
    grain) that drifts and turns slowly, so that the encoder uses motion vectors and B-frames and
    the stream has a bitrate like camera footage, unlike flat colours. ``grain``: the amplitude of a
    seeded noise drawn anew for every frame, as a camera's sensor adds (0: none)."""
    rng = np.random.default_rng(seed)
    w, h = size
    big = (h + 64, w + 64)
    coarse = rng.integers(0, 256, size=(big[0] // 16 + 2, big[1] // 16 + 2, 3)).astype(np.float32)
    texture = np.kron(coarse, np.ones((16, 16, 1), np.float32))[:big[0], :big[1]]
    texture = 0.7 * texture + 0.3 * rng.integers(0, 256, size=big + (3,)).astype(np.float32)
    texture = texture.astype(np.uint8)
    for i in range(int(round(seconds * fps))):
        t = i / fps
        dy = int(32 + 30 * np.sin(0.7 * t))
        dx = int(32 + 30 * np.cos(0.5 * t))
        frame = texture[dy:dy + h, dx:dx + w]
        if int(t // 4) % 2:  # the scene changes every 4 s
            frame = frame[::-1]
        if grain:
            noise = rng.integers(-grain, grain + 1, size=frame.shape, dtype=np.int16)
            frame = np.clip(frame + noise, 0, 255).astype(np.uint8)
        yield np.ascontiguousarray(frame)


def rotate_in_header(src, dst):
    """Copy the mp4 ``src`` to ``dst`` with its video track's display matrix set to a 90-degree
    clockwise turn, as a phone filming upright writes it (the pixels are left as they are)."""
    import struct
    data = open(src, 'rb').read()
    identity = struct.pack('>9i', 0x10000, 0, 0, 0, 0x10000, 0, 0, 0, 0x40000000)
    turn = struct.pack('>9i', 0, 0x10000, 0, -0x10000, 0, 0, 0, 0, 0x40000000)
    i = data.index(identity, data.index(b'tkhd'))  # the track's matrix, not the movie's
    with open(dst, 'wb') as f:
        f.write(data[:i] + turn + data[i + 36:])


def cut_with_edit_list(src, dst, seconds):
    """Copy the mp4 ``src`` to ``dst`` starting ``seconds`` in without re-encoding, as ``ffmpeg -ss
    seconds -i src -c copy dst`` does: the packets from the key frame before that time on, with an edit
    list that hides those before it (FFmpeg's demuxer marks them ``is_discard``; a player decodes them
    for reference and never shows them). Any codec PyAV can decode (``opaque``: a stream whose decoder,
    such as libdav1d for AV1, cannot encode)."""
    with av.open(str(src)) as i, av.open(str(dst), 'w') as o:
        s = i.streams.video[0]
        t, shift = o.add_stream_from_template(s, opaque=True), int(seconds / s.time_base)
        for p in i.demux(s):
            if p.dts is not None:
                p.pts, p.dts, p.stream = p.pts - shift, p.dts - shift, t
                o.mux(p)
