"""Long videos: probing, 5-second segment windows and segment re-encoding, with PyAV.

Times are seconds from the video's first frame (its lowest presentation timestamp).
"""
import bisect
import os
from dataclasses import dataclass
from fractions import Fraction
from itertools import groupby

import av
import numpy as np
from av.video.frame import PictureType

from util.errors import InputError
from util.fileio import atomic_write, remove_stale_temporaries


class VideoError(InputError, ValueError):
    """A file that is not a usable video; the message says why (step 1 reports it in bad_videos.csv)."""


def video_stream(container):
    """The container's first video stream that is not a cover picture (an audio file's artwork, which
    FFmpeg lists as a one-frame video stream), or None."""
    cover = av.stream.Disposition.attached_pic
    return next((s for s in container.streams.video if not s.disposition & cover), None)


# containers that store each frame's time in decode order (its chunk's dts) and no presentation time
DTS_ONLY_FORMATS = {'avi'}


def with_pts(container, frames):
    """``(frame, pts)`` for the ``frames`` a decoder hands out from ``container``, in presentation order.
    In AVI FFmpeg guesses every packet's pts, and with B-frames the decoder hands out frames whose
    guessed pts are out of order (DivX's packed B-frames, a P-frame and the B-frame shown before it in
    one chunk; H.264 with B-frames), in the right order: there a frame's pts is the time of the chunk
    that made the decoder hand it out (its dts), less the decoder's delay (the first frame's dts less
    its pts); the frames flushed at the end follow one chunk apart. Elsewhere the frame's own pts."""
    if container.format.name not in DTS_ONLY_FORMATS:
        for frame in frames:
            yield frame, frame.pts
        return
    delay = pts = None
    for frame in frames:
        if frame.dts is not None:
            if delay is None:
                delay = 0 if frame.pts is None else frame.dts - frame.pts
            pts = frame.dts - delay
        elif pts is not None:
            pts += 1  # AVI's time base: one tick a chunk
        else:
            pts = frame.pts
        yield frame, pts


@dataclass
class VideoInfo:
    num_frames: int
    fps: float
    duration: float
    width: int
    height: int
    timed: bool = True  # every frame has a presentation time (else frames are timed by position: n / fps)


def probe_video(path):
    """Duration, frame count, fps and size of ``path``, read from the packets of its first video
    stream (all packets are demuxed, nothing but the first frame is decoded), so containers
    without a frame count in their header (mkv, webm, avi) are handled and truncation is caught.
    Raises VideoError for missing, empty, unreadable, truncated, non-video and zero-frame files."""
    if not os.path.isfile(path):
        raise VideoError('file not found')
    if os.path.getsize(path) == 0:
        raise VideoError('empty file (0 bytes)')
    try:
        container = av.open(path, metadata_errors='replace')  # tags that are not UTF-8 (old AVI, MKV titles)
    except av.FFmpegError as e:
        raise VideoError(f'not a readable video: corrupt, truncated or not a video format '
                         f'(FFmpeg: {e.strerror or e})') from None
    with container:
        return _probe(container)


def _probe(container):
    stream = video_stream(container)
    if stream is None:
        raise VideoError('no video stream')
    rate = stream.average_rate or stream.guessed_rate
    tb = stream.time_base
    frame_ticks = round(1 / (rate * tb)) if rate and tb else 0
    n, first, end, decoded, untimed = 0, None, None, False, False
    try:
        for packet in container.demux(stream):
            if packet.size == 0:
                continue
            t = packet.pts if packet.pts is not None else packet.dts
            if not packet.is_discard:  # (an edit list's frames before its start: decoded, never shown)
                n += 1
                untimed = untimed or packet.pts is None
                if t is not None:
                    first = t if first is None else min(first, t)
                    end = max(end or t, t + (packet.duration or frame_ticks))
            if not decoded:
                decoded = bool(packet.decode())
        if not decoded and n:
            decoded = bool(stream.codec_context.decode(None))
    except av.FFmpegError as e:
        raise VideoError(f'corrupt or truncated: read error after {n} frames ({e.strerror or e})') from None
    if n == 0:
        raise VideoError('video stream has no frames')
    if not decoded:
        raise VideoError(f'no frame of its {n} could be decoded')
    if untimed and rate:  # a frame without presentation time: step 3 times every frame by its position
        duration = float(n / rate)
    elif first is None or not tb or end <= first:
        if not rate:
            raise VideoError('no timestamps and no frame rate: duration unknown')
        duration = float(n / rate)
    else:
        duration = float((end - first) * tb)
        if rate and abs(duration - n / rate) < 0.5 / rate:  # constant rate: undo timestamp rounding
            duration = float(n / rate)
    # Truncation: the data ends before the header's end time. With fewer frames than the header's count
    # the end times must agree to a frame (AVI counts dropped frames, stored as empty chunks never demuxed).
    stated, short = _stated_end(container, stream), n < (stream.frames or 0)
    if stated is not None and end is not None and tb:
        ends = float(end * tb)
        if ends < stated - (1.5 / float(rate) if short and rate else max(2.0, 0.1 * duration)):
            raise VideoError(f'truncated: video data ends at {ends:.2f} s, file says {stated:.2f} s'
                             + (f' ({n} of its {stream.frames} frames found)' if short else ''))
    elif short:
        raise VideoError(f'truncated: header says {stream.frames} frames, only {n} found')
    fps = float(rate) if rate else n / duration
    return VideoInfo(num_frames=n, fps=fps, duration=duration, width=stream.width, height=stream.height,
                     timed=not untimed)


def _stated_end(container, stream):
    """End time (s) the header gives the video stream, or None. The container's duration covers every
    stream (audio may run longer than the video), so it is used only for files with one stream."""
    if stream.duration and stream.time_base:
        return float(((stream.start_time or 0) + stream.duration) * stream.time_base)
    tag = stream.metadata.get('DURATION')  # Matroska / WebM: HH:MM:SS.nnnnnnnnn
    if tag:
        try:
            h, m, sec = tag.split(':')
            return int(h) * 3600 + int(m) * 60 + float(sec)
        except ValueError:
            return None
    if container.duration and len(container.streams) == 1:
        return ((container.start_time or 0) + container.duration) / av.time_base
    return None


def segment_windows(duration, segment_sec=5.0, min_last_sec=1.0):
    """``[(start, end)]`` = ``[k*S, min((k+1)*S, duration))``; a last window shorter than
    ``min_last_sec`` is dropped (so a video shorter than ``min_last_sec`` has none)."""
    windows, k = [], 0
    while k * segment_sec < duration:
        start, end = round(k * segment_sec, 6), round(min((k + 1) * segment_sec, duration), 6)
        if end > start and end - start >= min_last_sec:  # rounding can leave an empty last window
            windows.append((start, end))
        k += 1
    return windows


def format_time(t):
    """Seconds as in the original release's folder names: ``5`` when whole, else up to 3 decimals."""
    return str(int(t)) if float(t).is_integer() else f'{t:.3f}'.rstrip('0').rstrip('.')


def segment_file(out_dir, video_id, start, end):
    """The original release's layout: ``<out_dir>/<video_id>/<start>-<end>/video.mp4``."""
    return os.path.join(out_dir, video_id, f'{format_time(start)}-{format_time(end)}', 'video.mp4')


def reencode_segments(path, windows, out_paths, codec='libx264', timed=True):
    """Write the frames of each window ``[start, end)`` of ``path`` to its own H.264 mp4 (so each
    file starts with a keyframe and holds exactly its window's frames), decoding the video once.
    ``timed``: ``VideoInfo.timed`` (False: every frame timed by its position, as step 3 does then).
    Files are written atomically; those already present are complete and kept, and the temporary
    files a process that died left for them are removed. Returns the number of frames written per
    window (0 for kept files)."""
    remove_stale_temporaries(out_paths)
    counts = [0] * len(windows)
    todo = [not os.path.isfile(p) for p in out_paths]
    if not any(todo):
        return counts
    starts = [s for s, _ in windows]
    try:
        with av.open(path, metadata_errors='replace') as container:
            stream = video_stream(container)
            stream.thread_type = 'AUTO'
            rate = stream.average_rate or stream.guessed_rate
            tb = stream.time_base

            def timed_frames():
                origin = None
                for i, (frame, pts) in enumerate(with_pts(container, container.decode(stream))):
                    if pts is None or not timed:
                        yield Fraction(i) / rate, frame
                        continue
                    origin = pts if origin is None else origin
                    yield (pts - origin) * tb, frame

            def window_of(item):
                k = bisect.bisect_right(starts, item[0]) - 1
                return k if k >= 0 and item[0] < windows[k][1] else None

            for k, group in groupby(timed_frames(), key=window_of):
                if k is None or not todo[k]:
                    continue

                def write(tmp):
                    counts[k] = _encode(tmp, (upright(f) for _, f in group), rate, codec)
                atomic_write(out_paths[k], write)
    except av.FFmpegError as e:
        raise VideoError(f'decode/encode error while re-encoding ({e.strerror or e})') from None
    missing = [f'{s}-{e}' for (s, e), p in zip(windows, out_paths) if not os.path.isfile(p)]
    if missing:
        raise VideoError(f'no frames in window(s) {", ".join(missing)}')
    return counts


def upright(frame):
    """``frame`` turned as its display matrix says (phones filming upright), as FFmpeg's command line
    does before re-encoding; unrotated frames are returned as they are."""
    turns = round((frame.rotation or 0) / 90) % 4  # counter-clockwise quarter turns
    if not turns:
        return frame
    rgb = np.ascontiguousarray(np.rot90(frame.to_ndarray(format='rgb24'), k=turns))
    return av.VideoFrame.from_ndarray(rgb, format='rgb24')


def _encode(tmp_path, frames, rate, codec):
    """Encode ``frames`` at constant ``rate`` into a new mp4 (yuv420p needs even sizes)."""
    n = 0
    with av.open(tmp_path, mode='w', format='mp4') as out:
        stream = out.add_stream(codec, rate=rate)
        for frame in frames:
            if n == 0:
                w, h = frame.width, frame.height
                stream.width, stream.height, stream.pix_fmt = w - w % 2, h - h % 2, 'yuv420p'
            frame = frame.reformat(width=stream.width, height=stream.height, format='yuv420p')
            frame.pts, frame.time_base, frame.pict_type = n, 1 / Fraction(rate), PictureType.NONE
            for packet in stream.encode(frame):
                out.mux(packet)
            n += 1
        for packet in stream.encode():
            out.mux(packet)
    return n
