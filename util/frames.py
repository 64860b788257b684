"""Frames for LanguageBind video: which frames, fast decoding, and the deterministic transform.

Frame choice (as LanguageBind's decord path, ``np.linspace(0, n - 1, 8, dtype=int)``): the 8 frames
spread evenly from the first to the last frame of a segment. A segment of a long video is a time
window ``[start, end)``; its frames are those whose presentation time, counted from the video's
first frame, lies in the window (the rule step 1 uses to cut ``--reencode`` files). A segment file
is a window holding all of its frames.

Each video is read twice: its packets (no decoding) to learn every frame's timestamp, then one
sequential decode in which only the chosen frames are converted to RGB and shrunk at once, and in
which the decoder skips the non-reference frames (B-frames nothing else is predicted from) that no
segment samples: about half the frames of an H.264 file with libx264's defaults. Reference frames are
always decoded, so the frames kept are bit for bit those of a full decode (also with open GOPs: the
file is read from its start, never entered by seeking). A window holding no frame (a pause in a
variable-frame-rate video) takes the last frame before it. Rotated videos (a display matrix, as
phones write) are turned upright as FFmpeg's command line does.

Transform (LanguageBind's, without its random flip): uint8 / 255, normalise with the OpenAI CLIP
mean/std, resize the short side to 224 (bilinear), centre crop 224. Resizing and normalising are
both linear, so they are swapped here (normalise the small crop, not the full frame); the result
equals LanguageBind's to float rounding.
"""
import functools
import math
from collections import defaultdict

import av
from av.video.reformatter import VideoReformatter
import numpy as np
import torch

from util.errors import InputError

NUM_FRAMES = 8
SIZE = 224
# decode_segments(raw=True) leaves frames up to 720p untransformed: such a frame crosses the process
# boundary at most 4.6 times as large as the transformed one (uint8 1280x720x3 against float 3x224x224)
RAW_MAX_PIXELS = 1280 * 720
MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)


class DecodeError(InputError, RuntimeError):
    """A video (or one of its segments) could not be decoded; the message names file and segment."""


def frame_indices(n, num=NUM_FRAMES):
    """Positions of the ``num`` frames kept out of ``n`` (LanguageBind's linspace rule)."""
    return np.linspace(0, n - 1, num, dtype=int)


@functools.lru_cache(maxsize=None)
def _mean_std(device):
    """CLIP's mean and std (times 255) on ``device``, made once per device (no copy per segment)."""
    return tuple(torch.tensor(v, device=device).view(1, 3, 1, 1) * 255 for v in (MEAN, STD))


def transform(frames):
    """``[T, H, W, 3]`` uint8 frames (numpy, or a tensor on any device) -> ``[3, T, 224, 224]`` float32
    model input on the same device."""
    x = torch.as_tensor(frames).float().permute(0, 3, 1, 2)  # channels-last memory: fast resize kernel
    h, w = x.shape[-2:]
    size = (int(math.floor(h / w * SIZE)), SIZE) if w < h else (SIZE, int(math.floor(w / h * SIZE)))
    # PyTorch's CPU bilinear resize picks its kernel by the thread count for 3 channels (1 thread: the
    # channels-last kernel, else the generic one; different float rounding): on CPU always the 1-thread
    # kernel, as in the DataLoader workers, so that files depend neither on --threads nor on
    # --num_workers / --transform_on
    threads = torch.get_num_threads()
    if x.device.type == 'cpu':
        torch.set_num_threads(1)
    try:
        # = F.interpolate(x, size, mode='bilinear', align_corners=False), always the native kernel: under
        # step 3's deterministic mode F.interpolate runs a Python decomposition on CUDA instead (written
        # for a deterministic backward; its first call imported modules for 3 s on the GPU machine)
        x = torch.ops.aten.upsample_bilinear2d.vec(x, size, False, None)
    finally:
        torch.set_num_threads(threads)
    i, j = int(round((size[0] - SIZE) / 2.0)), int(round((size[1] - SIZE) / 2.0))
    x = x[:, :, i:i + SIZE, j:j + SIZE]
    mean, std = _mean_std(x.device)
    x = (x - mean) / std
    return x.permute(1, 0, 2, 3).contiguous()


def _frame_keys(container, stream, rate):
    """Keys of all frames in presentation order, their times (s from the first frame), the time the
    last frame ends (its time plus its duration), and whether the keys are timestamps (else decode
    positions, for containers without timestamps)."""
    pts, end = [], None
    for p in container.demux(stream):
        if p.size:
            pts.append(p.pts)
            if p.pts is not None and p.duration:
                end = p.pts + p.duration if end is None else max(end, p.pts + p.duration)
    if pts and None not in pts:
        pts.sort()
        tb = stream.time_base  # ints divided as float(Fraction) divides them: the same floats, 10x faster
        times = [(p - pts[0]) * tb.numerator / tb.denominator for p in pts]
        last = float((end - pts[0]) * stream.time_base) if end is not None else times[-1] + 1 / rate
        return pts, times, max(last, times[-1]), True
    return list(range(len(pts))), [i / rate for i in range(len(pts))], len(pts) / rate, False


def _rgb(frame, reformatter):
    """``[H, W, 3]`` uint8 of a decoded frame, turned upright when the file carries a rotation (a
    display matrix, as phones write), as FFmpeg's command line does by default. ``reformatter``: one
    ``VideoReformatter`` per video, which keeps its conversion context from frame to frame
    (``frame.reformat`` builds a new one for every frame: 8x slower at 480x270)."""
    rgb = reformatter.reformat(frame, format='rgb24')  # then one view of its plane
    plane = rgb.planes[0]
    x = np.frombuffer(plane, np.uint8).reshape(rgb.height, plane.line_size)[:, :rgb.width * 3]
    x = np.ascontiguousarray(x).reshape(rgb.height, rgb.width, 3)
    turns = round((frame.rotation or 0) / 90) % 4  # counter-clockwise quarter turns
    return np.ascontiguousarray(np.rot90(x, k=turns)) if turns else x


def _packets_then_flush(container, stream, need):
    """Frames of ``stream`` decoded packet by packet. Packets whose frame is not in ``need`` (a set of
    presentation timestamps; None: decode everything) are sent with ``skip_frame = NONREF``: the
    decoder then drops them when no other frame refers to them, and decodes them otherwise, so every
    frame it outputs is exactly the frame a full decode gives."""
    codec = stream.codec_context
    mode = 'DEFAULT'
    for packet in container.demux(stream):
        if not packet.size:
            continue
        if need is not None:
            want = 'DEFAULT' if packet.pts is None or packet.pts in need else 'NONREF'
            if want != mode:
                codec.skip_frame = mode = want
        yield from codec.decode(packet)
    codec.skip_frame = 'DEFAULT'
    yield from codec.decode(None)


def _assemble(items, shared):
    """One finished segment from its ``num`` frames (each a transformed ``[3, 224, 224]`` tensor or an
    untransformed ``[H, W, 3]`` uint8 array): ``[num, H, W, 3]`` uint8 when every frame is untransformed
    and of one size, else the model input ``[3, num, 224, 224]`` (a view of ``[num, 3, 224, 224]``
    memory), the untransformed frames transformed here. ``shared``: in shared memory."""
    raw = all(isinstance(f, np.ndarray) for f in items) and len({f.shape for f in items}) == 1
    if not raw:
        items = [transform(f[None])[:, 0] if isinstance(f, np.ndarray) else f for f in items]
    first = torch.as_tensor(items[0])
    out = torch.empty((len(items),) + tuple(first.shape), dtype=first.dtype)
    if shared:
        out.share_memory_()
    for i, f in enumerate(items):
        out[i] = torch.as_tensor(f)
    return out if raw else out.transpose(0, 1)


# codecs whose decoders honour skip_frame = NONREF by dropping only frames nothing refers to
SKIP_NONREF_CODECS = {'h264', 'hevc', 'mpeg2video', 'mpeg1video'}


def decode_segments(path, windows=None, num=NUM_FRAMES, threads=1, skip=True, stats=None, shared=False, raw=False):
    """Yield ``(k, [3, num, 224, 224])`` for each window ``k`` of ``windows`` (``[(start, end)]`` in
    seconds; ``None``: the whole file is one segment), in order, opening ``path`` once and decoding it
    once (``threads`` FFmpeg threads). Each is a view of ``[num, 3, 224, 224]`` memory, the layout
    the model reshapes to. A window that holds no frame (a pause in a variable-frame-rate video) takes
    the last frame before it, ``num`` times. ``skip``: let the decoder drop the non-reference frames
    no segment samples (the frames returned are the same either way). ``stats`` (a dict) receives the
    number of frames decoded and converted. ``shared``: build each segment in shared memory (a
    DataLoader worker then hands it over without a copy). ``raw``: leave the transform to the caller
    (``transform``, e.g. on the GPU) for frames of at most RAW_MAX_PIXELS whose resize (short side 224)
    is no larger (aspect ratio up to 18:1): such a segment is the
    ``[num, H, W, 3]`` uint8 frames, turned upright (a segment whose frames are larger, or not all of
    one size, is transformed here). Raises DecodeError naming the file and the segment it stopped at."""
    def where(k):
        return f'{path}: segment {k} [{windows[k][0]:g}-{windows[k][1]:g} s]' if windows else path

    try:
        container = av.open(path)
    except (av.FFmpegError, OSError) as e:
        raise DecodeError(f'{path}: cannot open ({e})') from None
    with container:
        if not container.streams.video:
            raise DecodeError(f'{path}: no video stream')
        stream = container.streams.video[0]
        try:
            rate = float(stream.average_rate or stream.guessed_rate or 25)
            keys, times, end_time, by_pts = _frame_keys(container, stream, rate)
        except av.FFmpegError as e:
            raise DecodeError(f'{path}: read error ({e})') from None
        if not keys:
            raise DecodeError(f'{path}: no frames')
        spans = [(0, len(keys))] if windows is None else [
            (int(np.searchsorted(times, s)), int(np.searchsorted(times, e))) for s, e in windows]
        wanted = defaultdict(list)  # frame key -> the (segment, slot) places it fills
        for k, (a, b) in enumerate(spans):
            if windows and windows[k][1] > end_time + max(2 / rate, 0.1):
                raise DecodeError(f'{where(k)}: the frames end at {end_time:.2f} s (truncated or damaged file)')
            picks = [a + i for i in frame_indices(b - a, num)] if b > a else [max(a - 1, 0)] * num
            for slot, i in enumerate(picks):
                wanted[keys[i]].append((k, slot))
        todo = sorted(wanted)  # kept frames in presentation order
        buffers = [None] * len(spans)  # each segment's frames, assembled when all are there
        missing = [num] * len(spans)
        done = nxt = decoded = converted = 0
        skip = skip and by_pts and stream.codec_context.name in SKIP_NONREF_CODECS
        reformatter = VideoReformatter()
        try:
            container.seek(0)
            if threads > 1:
                stream.thread_type, stream.codec_context.thread_count = 'AUTO', threads
            for pos, frame in enumerate(_packets_then_flush(container, stream, set(todo) if skip else None)):
                decoded += 1
                key = frame.pts if by_pts else pos
                if key is None:
                    continue
                x = None
                while nxt < len(todo) and todo[nxt] <= key:  # < key: the decoder dropped it, take the next
                    if x is None:
                        x = _rgb(frame, reformatter)
                        h, w = x.shape[:2]
                        # raw: at most RAW_MAX_PIXELS, and so is its resize before the crop (a frame
                        # of extreme aspect ratio resizes to a huge one: its failure stays this video's)
                        small = h * w <= RAW_MAX_PIXELS and SIZE * SIZE * max(h, w) <= RAW_MAX_PIXELS * min(h, w)
                        x = np.array(x) if raw and small else transform(x[None])[:, 0]  # raw: its own copy
                        converted += 1
                    for k, slot in wanted[todo[nxt]]:
                        if buffers[k] is None:
                            buffers[k] = [None] * num
                        buffers[k][slot] = x
                        missing[k] -= 1
                    nxt += 1
                while done < len(spans) and missing[done] == 0:
                    yield done, _assemble(buffers[done], shared)
                    buffers[done] = None
                    done += 1
                if done == len(spans):
                    return
        except av.FFmpegError as e:
            raise DecodeError(f'{where(done)}: decode error ({e})') from None
        finally:
            if stats is not None:
                stats.update(decoded=decoded, converted=converted)
        raise DecodeError(f'{where(done)}: video data ends before all its frames were decoded')
