"""Frames for LanguageBind video: which frames, fast decoding, and the deterministic transform.

Frame choice (as LanguageBind's decord path, ``np.linspace(0, n - 1, 8, dtype=int)``): the 8 frames
spread evenly from the first to the last frame of a segment. A segment of a long video is a time
window ``[start, end)``; its frames are those whose presentation time, counted from the video's
first frame, lies in the window (the rule step 1 uses to cut ``--reencode`` files); frames an mp4's
edit list hides (a file cut without re-encoding) are decoded for reference only. A segment file
is a window holding all of its frames.

Each video is read twice: its packets (no decoding) to learn every frame's timestamp, then one
sequential decode in which only the chosen frames are converted to RGB and shrunk at once, and in
which the decoder skips the non-reference frames (B-frames nothing else is predicted from) that no
segment samples: about half the frames of an H.264 file with libx264's defaults. Reference frames
are always decoded, so the frames kept are bit for bit those of a full decode. H.264 and HEVC in MP4
or Matroska are cut at their IDR pictures (HEVC: also CRA; where decoding may start without changing
any frame), VP9 and AV1 there (and in WebM) at their shown key frames (AV1: those after a sequence
header), into parts of whole GOPs (a long video into about MAX_PARTS), each sought to and stopped
after its last sampled frame, on as many threads as the caller gives (the parts, and so the frames,
do not depend on the number of threads; from the first part that does not decode cleanly, a damaged
file is decoded from its start, except that damage after a GOP's last sampled frame is never
decoded). Other videos (H.264 open GOPs, MPEG-TS, other codecs; streams whose reorder depth the
decoder learns only while decoding, or that send parameter sets of their own in the stream; GOPs
holding more than PART_BYTES of sampled frames) are decoded in one piece from their start. Every
decoder runs on one thread: FFmpeg's frame threads conceal damage differently with each thread count
and run, and so do its slice threads (H.264 with several slices; HEVC's wavefront rows, libx265's
default; exact on undamaged streams only), which PyAV starts as many as cores; dav1d's threads decode
frames in parallel. A window holding no frame (a pause in a variable-frame-rate video) takes the last
frame before it. Rotated videos (a display matrix, as phones write) are turned upright as FFmpeg's
command line does.

Transform (LanguageBind's, without its random flip): uint8 / 255, normalise with the OpenAI CLIP
mean/std, resize the short side to 224 (bilinear), centre crop 224. Resizing and normalising are
both linear, so they are swapped here (normalise the small crop, not the full frame); the result
equals LanguageBind's to float rounding.
"""
import bisect
import functools
import math
from collections import defaultdict, deque
from concurrent.futures import ThreadPoolExecutor

import av
from av.video.reformatter import VideoReformatter
import numpy as np
import torch

from util.errors import InputError
from util.video import DTS_ONLY_FORMATS, video_stream, with_pts

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


def _nal_length_size(codec):
    """Bytes of each NAL unit's length prefix in packets of an H.264 / HEVC stream stored as in MP4 and
    Matroska (its extradata an avcC / hvcC record), else None."""
    x = codec.extradata or b''
    if codec.name == 'h264' and len(x) >= 7 and x[0] == 1:
        return (x[4] & 3) + 1
    if codec.name == 'hevc' and len(x) >= 23 and x[0] == 1:
        return (x[21] & 3) + 1
    return None


def _nal_units(data, size):
    """The NAL units of a packet or record (``size``-byte length prefixes) of at least 2 bytes (a shorter
    one is neither a parameter set nor a slice: skipped, as FFmpeg skips it); stops at a length past
    the end (where FFmpeg fails the packet)."""
    i = 0
    while i + size < len(data):
        n = int.from_bytes(data[i:i + size], 'big')
        i += size
        if i + n > len(data):
            return
        if n > 1:
            yield data[i:i + n]
        i += n


def _nal_type(nal, codec_name):
    """A NAL unit's type, or None for an HEVC unit of a layer other than the base layer."""
    if codec_name == 'h264':
        return nal[0] & 0x1f
    return None if nal[0] & 1 or nal[1] >> 3 else (nal[0] >> 1) & 0x3f


PARAMETER_SETS = {'h264': (7, 8), 'hevc': (32, 33, 34)}  # SPS, PPS (and VPS)


def _extradata_parameter_sets(codec):
    """The parameter sets of an avcC / hvcC record (``codec.extradata``), as bytes without trailing zero
    bytes, or None when it cannot be read. (A parameter set ends in its stop bit: zero bytes after it
    are trailing_zero_8bits of an Annex B stream, which FFmpeg keeps in the extradata it takes from a
    stream with 4-byte start codes and strips from the packets it muxes.)"""
    x, sets = bytes(codec.extradata or b''), set()
    try:
        if codec.name == 'h264':
            i = 5
            for mask in (0x1f, 0xff):  # the SPS, then the PPS
                count, i = x[i] & mask, i + 1
                for _ in range(count):
                    n = int.from_bytes(x[i:i + 2], 'big')
                    sets.add(x[i + 2:i + 2 + n].rstrip(b'\0'))
                    i += 2 + n
        else:
            i = 23
            for _ in range(x[22]):
                count, i = int.from_bytes(x[i + 1:i + 3], 'big'), i + 3
                for _ in range(count):
                    n = int.from_bytes(x[i:i + 2], 'big')
                    sets.add(x[i + 2:i + 2 + n].rstrip(b'\0'))
                    i += 2 + n
    except IndexError:
        return None
    return sets if i <= len(x) else None


def _scan(data, codec_name, size, sets):
    """``(is_idr, known)`` for a packet: whether it is an IDR picture (its first picture NAL unit, of
    the base layer; for HEVC any random-access picture, CRA and BLA too), from which decoding gives
    exactly the frames of a decode from the file's start shown from it on (no later frame shown
    after it refers to an earlier one; the frames of an open GOP shown before a CRA, which the decoder
    drops when it starts there, belong to the part before); and whether the
    parameter sets it carries, if any, are those of ``sets`` (a part decoded from an IDR knows only
    those)."""
    idr, known = None, True
    for nal in _nal_units(data, size):
        kind = _nal_type(nal, codec_name)
        if kind in PARAMETER_SETS[codec_name]:
            known = known and bytes(nal).rstrip(b'\0') in sets
        elif idr is None and kind is not None and (1 <= kind <= 5 if codec_name == 'h264' else kind < 32):
            idr = kind == 5 if codec_name == 'h264' else 16 <= kind <= 21  # HEVC: BLA, IDR, CRA
    return bool(idr), known


def _vp9_key(data):
    """Whether a VP9 packet starts with a shown key frame (a superframe starts with its first frame),
    from which decoding gives exactly the frames of a decode from the file's start: a key frame
    refreshes every reference and resets every probability context."""
    b = data[0] if len(data) else 0
    if b >> 6 != 2:  # frame_marker
        return False
    i = 4 + (b >> 4 & 3 == 3)  # profile bits (profile 3: a reserved bit), then show_existing_frame
    return not b >> (7 - i) & 1 and not b >> (6 - i) & 1 and bool(b >> (5 - i) & 1)  # key frame, shown


def _av1_key(data):
    """Whether an AV1 temporal unit starts a new coded video sequence: a sequence header, then a
    first frame header (base layer) of a shown key frame, which refreshes every reference (a random
    access point of the AV1 specification)."""
    i, reduced = 0, None
    try:
        while i < len(data):
            h = data[i]
            kind, i = h >> 3 & 15, i + 1 + (h >> 2 & 1)  # the OBU's type; its extension byte
            if h >> 7:  # forbidden bit
                return False
            if h & 2:  # obu_size, leb128
                n, shift = 0, 0
                while True:
                    n, i, shift = n | (data[i] & 0x7f) << shift, i + 1, shift + 7
                    if not data[i - 1] & 0x80:
                        break
            else:
                n = len(data) - i
            if n and kind == 1:  # sequence header: seq_profile(3) still_picture(1) reduced_still_picture_header(1)
                reduced = data[i] >> 3 & 1
            elif n and kind in (3, 6):  # frame header, frame: show_existing_frame(1) frame_type(2)
                # show_frame(1), unless a reduced still picture (a key frame)
                return reduced is not None and (reduced == 1 or data[i] >> 4 == 1)
            i += n
    except IndexError:
        pass
    return False


def _reorder_depth(pts):
    """How many frames a decoder must hold back to output ``pts`` (in decode order) in presentation
    order: the most frames decoded before one frame and shown after it (looking 16 frames back, the
    most H.264 and HEVC allow)."""
    p = np.asarray(pts)
    later = np.zeros(len(p), dtype=np.int64)
    for d in range(1, min(16, len(p) - 1) + 1):
        later[d:] += p[:-d] > p[d:]
    return int(later.max()) if len(p) else 0


def _random_access(container, codec):
    """For a stream whose container seeks exactly, a function of a packet's bytes giving ``(whether
    decoding may start at it, whether a decode from such a start knows the parameter sets it
    carries)``; None for other streams."""
    if container.format.name not in SEEK_EXACT_FORMATS:
        return None
    if codec.name in VP9_DECODERS:
        return lambda data: (_vp9_key(data), True)
    if codec.name in AV1_DECODERS:
        return lambda data: (_av1_key(data), True)
    size = _nal_length_size(codec)
    sets = _extradata_parameter_sets(codec) if size else None
    return None if sets is None else lambda data: _scan(data, codec.name, size, sets)


def _frame_keys(container, stream, rate):
    """Keys of all frames shown (not those an edit list hides) in presentation order, their times (s
    from the first frame), the time the last frame ends (its time plus its duration), whether the keys
    are timestamps (else decode positions, for containers without timestamps), the timestamps of the
    pictures decoding may start at (in MP4 or Matroska: H.264 / HEVC IDR pictures, HEVC CRA too, VP9 /
    AV1 key frames; else none) and the reorder depth the timestamps need."""
    pts, end, idr = [], None, []
    scan = _random_access(container, stream.codec_context)
    for p in container.demux(stream):
        if p.size:
            if not p.is_discard:  # (an edit list's frames before its start: decoded, never shown)
                pts.append(p.pts)
                if p.pts is not None and p.duration:
                    end = p.pts + p.duration if end is None else max(end, p.pts + p.duration)
            if scan is not None:
                is_idr, known = scan(memoryview(p))
                if not known:  # parameter sets sent in the stream: no parts
                    scan, idr = None, []
                elif is_idr and p.is_keyframe and p.pts is not None:
                    idr.append(p.pts)
    if pts and None not in pts:
        depth = _reorder_depth(pts) if idr else 0
        pts.sort()
        tb = stream.time_base  # ints divided as float(Fraction) divides them: the same floats, 10x faster
        times = [(p - pts[0]) * tb.numerator / tb.denominator for p in pts]
        last = float((end - pts[0]) * stream.time_base) if end is not None else times[-1] + 1 / rate
        return pts, times, max(last, times[-1]), True, sorted(idr), depth
    return list(range(len(pts))), [i / rate for i in range(len(pts))], len(pts) / rate, False, [], 0


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


def _packets_then_flush(container, stream, need, start=None):
    """Frames of ``stream`` decoded packet by packet. Packets whose frame is not in ``need`` (a set of
    presentation timestamps; None: decode everything) are sent with ``skip_frame = NONREF``: the
    decoder then drops them when no other frame refers to them, and decodes them otherwise, so every
    frame it outputs is exactly the frame a full decode gives. ``start``: the timestamp of an IDR
    picture the container was just sought to: packets before it are not sent."""
    codec = stream.codec_context
    codec.skip_frame = mode = 'DEFAULT'
    for packet in container.demux(stream):
        if not packet.size:
            continue
        if start is not None:
            if packet.pts != start:
                if packet.dts is not None and packet.dts > start:
                    raise _SeekMissed
                continue
            start = None
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
VP9_DECODERS, AV1_DECODERS = {'vp9', 'libvpx-vp9'}, {'libdav1d', 'av1', 'libaom-av1'}
# containers whose seeking to a key frame's timestamp lands on that key frame (MP4 / MOV, Matroska)
SEEK_EXACT_FORMATS = {'mov,mp4,m4a,3gp,3g2,mj2', 'matroska,webm'}
# a part of a video holds at least this many sampled frames (one segment), at most PART_BYTES of them
# (as RGB; a video whose GOPs hold more is decoded in one piece), and threads decode parts ahead while
# they hold at most AHEAD_BYTES; a long video is cut into about MAX_PARTS parts (each part opens the
# file, a few ms for a long video's index) unless that makes parts hold over half of PART_BYTES
PART_FRAMES = NUM_FRAMES
MAX_PARTS = 64
PART_BYTES = 128 << 20
AHEAD_BYTES = 512 << 20


class _SeekMissed(Exception):
    """Seeking to an IDR picture landed after it (e.g. a Matroska file without an index)."""


def _opened(path, index):
    """``path`` opened again, at its first packet, its stream ``index`` decoded on one thread."""
    container = av.open(path, metadata_errors='replace')
    container.streams[index].codec_context.thread_count = 1
    return container


def _sampled(container, stream, todo, need, by_pts, count, start=None):
    """``(keys, frame)``: for the sorted frame keys ``todo``, each decoded frame that some of them take
    (a key takes the first frame output at or after it: a frame the decoder dropped is replaced by
    the next), as upright RGB, in order; stops once every key has its frame. ``need``: as in
    ``_packets_then_flush``. ``count``: ``[frames decoded, whether FFmpeg marked one corrupt]``."""
    reformatter = VideoReformatter()
    nxt = 0
    for pos, (frame, pts) in enumerate(with_pts(container, _packets_then_flush(container, stream, need, start))):
        count[0] += 1
        count[1] = count[1] or frame.is_corrupt
        key = pts if by_pts else pos
        if key is None:
            continue
        end = bisect.bisect_right(todo, key, nxt)
        if end > nxt:
            yield todo[nxt:end], _rgb(frame, reformatter)
            nxt = end
        if nxt == len(todo):
            return


def _parts(todo, idr, least=PART_FRAMES):
    """``[(start, keys)]``: the sorted frame keys ``todo`` cut at IDR pictures (``start``: the IDR's
    timestamp, None for the keys before the first one), whole GOPs and at least ``least`` keys a
    part: no frame is decoded by two parts but those the decoder holds back to reorder."""
    parts, gop = [], None  # gop: the IDR before the last key placed
    for key in todo:
        i = bisect.bisect_right(idr, key)
        start = idr[i - 1] if i else None
        if parts and (start == gop or len(parts[-1][1]) < least):  # never cut inside a GOP
            parts[-1][1].append(key)
        else:
            parts.append((start, [key]))
        gop = start
    return parts


def _sampled_in_parts(path, container, stream, parts, need, threads, count, frame_bytes):
    """``_sampled`` over the whole video, its ``parts`` decoded on ``threads`` threads (each part with a
    container of its own, sought to its IDR picture, and one decoder thread; PyAV lets go of the GIL
    while decoding), in order: at most ``threads`` parts at a time, and more than one only while
    they hold at most AHEAD_BYTES (``frame_bytes`` a frame). Decoding from an IDR picture is exact on
    an undamaged stream only: from the first part that is not decoded cleanly (a frame FFmpeg marks
    as corrupt, a decode error, data that ends early) the rest of the video is decoded front to back
    from the file's start (``container``, not read before), as without parts: the same frames and errors
    as then."""
    def run(start, keys):  # the part's frames, or None if it is not decoded cleanly
        # a new container (and decoder) for each part: a decoder that decoded another part before keeps
        # state through the seek's flush that changes how it decodes damage in this part (seen with
        # HEVC), so the frames would depend on which parts the thread took before
        n, out = [0, False], None
        try:
            if start is not None:
                with _opened(path, stream.index) as own:
                    try:
                        own.seek(start, stream=own.streams[stream.index], backward=True, any_frame=False)
                        out = list(_sampled(own, own.streams[stream.index], keys, need, True, n, start))
                    except _SeekMissed:
                        pass  # this part from the file's start instead: slower, the same frames
            if out is None:
                with _opened(path, stream.index) as own:
                    out = list(_sampled(own, own.streams[stream.index], keys, need, True, n))
        except (av.FFmpegError, IndexError):
            return None, n[0]
        return (None if n[1] or sum(len(k) for k, _ in out) < len(keys) else out), n[0]

    pool, queue, ahead = ThreadPoolExecutor(threads), deque(), [0]

    def results():  # each part's frames (or None), in order
        def take():
            future, size = queue.popleft()
            out, n = future.result()
            count[0] += n
            ahead[0] -= size
            return out

        for part in parts:
            size = len(part[1]) * frame_bytes
            while queue and (len(queue) >= threads or ahead[0] + size > AHEAD_BYTES):
                yield take()
            queue.append((pool.submit(run, *part), size))
            ahead[0] += size
        while queue:
            yield take()

    rest = None
    try:
        for i, out in enumerate(results()):
            if out is None:
                rest = [key for _, keys in parts[i:] for key in keys]
                break
            yield from out
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    if rest:
        yield from _sampled(container, stream, rest, need, True, count)


def decode_segments(path, windows=None, num=NUM_FRAMES, threads=1, skip=True, stats=None, shared=False, raw=False):
    """Yield ``(k, [3, num, 224, 224])`` for each window ``k`` of ``windows`` (``[(start, end)]`` in
    seconds; ``None``: the whole file is one segment), in order, decoding the file once (``threads``:
    parts decoded in parallel, see the module's docstring). Each is a view of
    ``[num, 3, 224, 224]`` memory, the layout the model reshapes to. A window that holds no frame (a
    pause in a variable-frame-rate video) takes the last frame before it, ``num`` times. ``skip``: let
    the decoder drop the non-reference frames no segment samples, and decode in parts (False: every
    frame, front to back; the frames returned are the same either way). ``stats`` (a dict) receives
    the number of frames decoded and converted, and of parts. ``shared``: build each segment in shared
    memory (a DataLoader worker then hands it over without a copy). ``raw``: leave the transform to the
    caller (``transform``, e.g. on the GPU) for frames of at most RAW_MAX_PIXELS whose resize (short
    side 224) is no larger (aspect ratio up to 18:1): such a segment is the ``[num, H, W, 3]`` uint8
    frames, turned upright (a segment whose frames are larger, or not all of one size, is transformed
    here). Raises DecodeError naming the file and the segment it stopped at."""
    def where(k):
        return f'{path}: segment {k} [{windows[k][0]:g}-{windows[k][1]:g} s]' if windows else path

    try:
        container = av.open(path, metadata_errors='replace')  # tags that are not UTF-8 (old AVI, MKV titles)
    except (av.FFmpegError, OSError) as e:
        raise DecodeError(f'{path}: cannot open ({e})') from None
    with container:
        stream = video_stream(container)
        if stream is None:
            raise DecodeError(f'{path}: no video stream')
        # one decoder thread (PyAV's default: slice threads, as many as cores), whatever the codec: on a
        # damaged stream FFmpeg's slice threads conceal differently with each count (H.264 with several
        # slices) and run (HEVC's wavefront rows); dav1d's threads decode frames in parallel
        stream.codec_context.thread_count = 1
        try:
            rate = float(stream.average_rate or stream.guessed_rate or 25)
            # the packets are read from a container of their own: ``container`` is then decoded from its
            # first packet without seeking back (``seek(0)`` goes to time 0, not to the first packet: in a
            # file whose timestamps start below 0, as an MPEG-TS whose clock wrapped, it skips the frames
            # before 0)
            with _opened(path, stream.index) as index:
                keys, times, end_time, by_pts, idr, depth = _frame_keys(index, index.streams[stream.index], rate)
        except (av.FFmpegError, IndexError) as e:  # IndexError: PyAV on a stream appearing mid-file
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
        done = converted = 0
        count = [0, False]  # frames decoded, whether one was marked corrupt
        # (AVI: not skipping, as a frame's time is that of the packet which makes the decoder hand it out)
        need = (set(todo) if skip and by_pts and stream.codec_context.name in SKIP_NONREF_CODECS
                and container.format.name not in DTS_ONLY_FORMATS else None)
        # parts whatever the number of threads (the frames depend on the file alone), when the decoder
        # knows the reorder depth from the start (else FFmpeg learns it while decoding, dropping a
        # frame where it grows: a part would not) and every part is small enough
        frame_bytes = stream.codec_context.width * stream.codec_context.height * 3
        least = max(PART_FRAMES, min(-(-len(todo) // MAX_PARTS), PART_BYTES // (2 * max(frame_bytes, 1))))
        parts = (_parts(todo, idr, least) if skip and by_pts and idr and stream.codec_context.reorder_depth >= depth
                 else [])
        if len(parts) < 2 or max(len(k) for _, k in parts) * frame_bytes > PART_BYTES:
            parts = []
        frames = None
        try:
            if parts:  # parts in parallel
                frames = _sampled_in_parts(path, container, stream, parts, need, max(threads, 1), count,
                                           frame_bytes)
            else:  # one decoder thread: FFmpeg's threads conceal damage differently with each count and run
                frames = _sampled(container, stream, todo, need, by_pts, count)
            for keys, x in frames:
                h, w = x.shape[:2]
                # raw: at most RAW_MAX_PIXELS, and so is its resize before the crop (a frame of extreme
                # aspect ratio resizes to a huge one: its failure stays this video's)
                small = h * w <= RAW_MAX_PIXELS and SIZE * SIZE * max(h, w) <= RAW_MAX_PIXELS * min(h, w)
                x = np.array(x) if raw and small else transform(x[None])[:, 0]  # raw: its own copy
                converted += 1
                for key in keys:
                    for k, slot in wanted[key]:
                        if buffers[k] is None:
                            buffers[k] = [None] * num
                        buffers[k][slot] = x
                        missing[k] -= 1
                while done < len(spans) and missing[done] == 0:
                    yield done, _assemble(buffers[done], shared)
                    buffers[done] = None
                    done += 1
            if done == len(spans):
                return
        except (av.FFmpegError, IndexError) as e:
            raise DecodeError(f'{where(done)}: decode error ({e})') from None
        finally:
            if frames is not None:
                frames.close()  # the parts' threads and containers, also when the caller stops early
            if stats is not None:
                stats.update(decoded=count[0], converted=converted, parts=max(len(parts), 1))
        raise DecodeError(f'{where(done)}: video data ends before all its frames were decoded')
