"""The original release's layout: one ``<root>/<video_id>/<start>-<end>/langbind_output.pt`` per segment
(read with ``util.embeddings.load_legacy_segments``)."""
import os

LEGACY_FILE = 'langbind_output.pt'


def _window(name):
    start, _, end = name.partition('-')
    try:
        return float(start), float(end)
    except ValueError:
        return None


def legacy_segment_paths(root, video_id):
    """One video's segment files in time order ([] if it has none)."""
    folder = os.path.join(root, video_id)
    if not os.path.isdir(folder):
        return []
    found = []
    for name in os.listdir(folder):
        window, path = _window(name), os.path.join(folder, name, LEGACY_FILE)
        if window is not None and os.path.isfile(path):
            found.append((window, path))
    return [p for _, p in sorted(found)]


def legacy_videos(root):
    """``{video_id: segment files in time order}`` for every video folder under ``root`` with segments."""
    videos = {}
    for vid in sorted(os.listdir(root)):
        paths = legacy_segment_paths(root, vid)
        if paths:
            videos[vid] = paths
    return videos
