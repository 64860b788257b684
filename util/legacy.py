"""The original release's layout: one ``<root>/<video_id>/<start>-<end>/langbind_output.pt`` per segment
(read with ``util.embeddings.load_legacy_segments``)."""
import os

LEGACY_FILE = 'langbind_output.pt'


def segment_window(path):
    """``(start, end)`` in seconds from the name of a segment file's folder (``<start>-<end>``, integer
    or float seconds), else None."""
    start, _, end = os.path.basename(os.path.dirname(path)).partition('-')
    try:
        return float(start), float(end)
    except ValueError:
        return None


def in_time_order(paths):
    """Segment files sorted by the windows their folder names give: a list in text order (``10-15``
    before ``5-10``, as a sorted file listing gives) is put in time order. As given when some folder
    name is not a window."""
    windows = [segment_window(p) for p in paths]
    if None in windows:
        return list(paths)
    return [p for _, p in sorted(zip(windows, paths))]


def legacy_segment_paths(root, video_id):
    """One video's segment files in time order ([] if it has none)."""
    folder = os.path.join(root, video_id)
    if not os.path.isdir(folder):
        return []
    paths = [os.path.join(folder, name, LEGACY_FILE) for name in os.listdir(folder)]
    return in_time_order([p for p in paths if segment_window(p) is not None and os.path.isfile(p)])


def legacy_videos(root):
    """``{video_id: segment files in time order}`` for every video folder under ``root`` with segments."""
    videos = {}
    for vid in sorted(os.listdir(root)):
        paths = legacy_segment_paths(root, vid)
        if paths:
            videos[vid] = paths
    return videos
