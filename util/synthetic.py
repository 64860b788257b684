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


def write_divx_packed_avi(path, frames, fps=15):
    """Encode ``frames`` (RGB arrays) as MPEG-4 part 2 with B-frames into an AVI the way DivX 5 stores
    them, "packed": a reference frame and the B-frame shown before it in one chunk, then a chunk
    holding a not-coded frame (N-VOP), so that every chunk gives one frame without delay; the stream
    says so in its user data (``DivX503b1393p``). Returns the number of frames."""
    codec = av.CodecContext.create('mpeg4', 'w')
    packets = []
    for i, rgb in enumerate(frames):
        if i == 0:
            codec.width, codec.height, codec.pix_fmt = rgb.shape[1], rgb.shape[0], 'yuv420p'
            codec.time_base, codec.framerate, codec.max_b_frames = Fraction(1, fps), fps, 1
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format='rgb24').reformat(format='yuv420p')
        frame.pts = i
        packets += [(p.pts, bytes(p), p.is_keyframe) for p in codec.encode(frame)]
    packets += [(p.pts, bytes(p), p.is_keyframe) for p in codec.encode(None)]
    first = packets[0][1]  # the headers, lavc's user data, then the first frame: DivX's user data instead
    i, j = first.index(b'\0\0\1\xb2'), first.index(b'\0\0\1\xb6')
    packets[0] = (packets[0][0], first[:i] + b'\0\0\1\xb2DivX503b1393p' + first[j:], True)
    # N-VOP: P type, modulo_time_base 0, marker, vop_time_increment 0, marker, vop_coded 0, stuffing
    bits = '0101' + '0' * (fps - 1).bit_length() + '10'
    bits += '0' + '1' * (-(len(bits) + 1) % 8)
    nvop = b'\0\0\1\xb6' + int(bits, 2).to_bytes(len(bits) // 8, 'big')
    chunks, k = [], 0
    while k < len(packets):
        pts, data, key = packets[k]
        if k + 1 < len(packets) and packets[k + 1][0] < pts:  # a B-frame shown before this frame follows
            chunks += [(data + packets[k + 1][1], key), (nvop, False)]
            k += 2
        else:
            chunks.append((data, key))
            k += 1
    with av.open(str(path), 'w', format='avi') as container:
        stream = container.add_stream('mpeg4', rate=fps)
        stream.width, stream.height, stream.pix_fmt = codec.width, codec.height, 'yuv420p'
        for n, (data, key) in enumerate(chunks):
            packet = av.Packet(data)
            packet.stream, packet.pts, packet.dts, packet.time_base = stream, n, n, Fraction(1, fps)
            packet.is_keyframe = key
            container.mux(packet)
    return len(packets)
