"""Step 3: LanguageBind video embeddings of every segment in a job file (step 2), one store file per video.

DataLoader workers decode the videos (each long video opened once, only the 8 frames per segment
that are used converted, and shrunk there or, with ``--transform_on device``, on the model's device);
the main process runs the vision tower on batches of ``--batch_size`` segments taken from several
videos and writes a video's file (atomically) as soon as all its segments are embedded. Finished
videos are skipped, so a killed run is resumed by running the same command again. Under
``torchrun --nproc_per_node N`` rank r takes jobs r, r+N, ...

A video that fails (it does not decode, it kills its decoding process, its file cannot be written)
never stops the others: it is listed in ``<embedding_dir>/failed_<job file name>.csv``, counted in the
summary and in ``--end_job_file``; ``--strict`` then makes the exit status 1.

    python langbind_preprocessing.py --video_path_file data/lvu_segments/paired_paths.json \
        --model_path checkpoints/LanguageBind_Video_Huge_V1.5_FT
"""
import time

STARTED = time.time()  # the first main() counts its first_batch_s and total_s from here: the imports below included

import argparse
import csv
import datetime
import io
import json
import multiprocessing
import os
import re
import signal
import sys
import threading

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from tqdm import tqdm

from util.embeddings import (EmbeddingError, encoder_name, is_complete, same_encoder, save_video_embeddings,
                             store_encoder, video_bytes)
from util.errors import InputError, run_main
from util.fileio import atomic_write_text, remove_stale_temporaries
from util.frames import NUM_FRAMES, SIZE, DecodeError, decode_segments, transform
from util.langbind import DEFAULT_MODEL, RANDOM_CONFIGS, load_encoder
from util.misc import default_device

DTYPES = {'fp32': torch.float32, 'bf16': torch.bfloat16, 'fp16': torch.float16}
# a worker's item (in shared memory): at most CHUNK segments (4.8 MB each transformed), and no more
# segments once it holds CHUNK_BYTES (raw uint8 segments: 3.1 MB at 480x270, 22 MB at 720p)
CHUNK = 8
CHUNK_BYTES = CHUNK * 3 * NUM_FRAMES * 224 * 224 * 4
FAILURE_COLUMNS = ['video_id', 'video_path', 'reason']


def get_args_parser():
    parser = argparse.ArgumentParser('LanguageBind segment embeddings', add_help=True)
    parser.add_argument('--video_path_file', required=True, help='job file written by prepare_paired_paths.py')
    parser.add_argument('--model_path', default=DEFAULT_MODEL,
                        help='local LanguageBind video checkpoint folder, or a hub name where the hub is reachable')
    parser.add_argument('--random_init', default=None, choices=sorted(RANDOM_CONFIGS),
                        help='use a randomly initialised encoder of this size (fixed seed; for tests, demos '
                             'and timing only: its files carry random_init=1)')
    parser.add_argument('--batch_size', default=64, type=int, help='segments per forward pass')
    parser.add_argument('--device', default='auto',
                        help='auto (cuda:$LOCAL_RANK under torchrun, else cuda when available, else cpu), '
                             'cpu, cuda or cuda:N')
    parser.add_argument('--dtype', default='bf16', choices=sorted(DTYPES),
                        help='autocast precision on GPU (on CPU the model always runs in fp32)')
    parser.add_argument('--num_workers', default=2, type=int, help='decoding processes (0: decode in this process)')
    parser.add_argument('--transform_on', default='auto', choices=['auto', 'workers', 'device'],
                        help='where the sampled frames are resized and normalised: in the decoding workers, or '
                             'on the model\'s device (frames up to 720p cross over as uint8). auto: device on a '
                             'GPU (the decoding CPUs then only decode), workers on CPU')
    parser.add_argument('--threads', default=None, type=int,
                        help='CPU threads of the model (default: half the cores this process may use, the other '
                             'half decodes). The numerics of a CPU forward pass depend on this number, so it never '
                             'follows --num_workers: files are the same whatever the number of workers')
    parser.add_argument('--overwrite', action='store_true',
                        help='re-embed videos whose store file was written by another encoder (without it, '
                             'such files stop the run: one store must not mix encoders)')
    parser.add_argument('--strict', action='store_true',
                        help='exit with status 1 when any video failed (default: list it and go on)')
    parser.add_argument('--end_job_file', default=None,
                        help='file written when every job of the job file has been processed (a summary, JSON)')
    return parser


def num_cpus():
    """Cores this process may use (os.sched_getaffinity is Linux-only)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count() or 1


def job_segments(job, threads=1, shared=False, raw=False):
    """``(segment index, frames)`` of one job: segments with a ``path`` from that file (the original
    release's re-encoded layout), the others from the long video, decoded once. ``frames``: the model
    input ``[3, 8, 224, 224]``, or with ``raw`` possibly the untransformed ``[8, H, W, 3]`` uint8 frames
    (util/frames.py ``decode_segments``). ``shared``: in shared memory, for a DataLoader worker."""
    segs = job['segments']
    for i, s in enumerate(segs):
        if s.get('path'):
            for _, x in decode_segments(s['path'], threads=threads, shared=shared, raw=raw):
                yield i, x
    windows = [i for i, s in enumerate(segs) if not s.get('path')]
    if windows:
        spans = [(segs[i]['start'], segs[i]['end']) for i in windows]
        for k, x in decode_segments(job['video_path'], spans, threads=threads, shared=shared, raw=raw):
            yield windows[k], x


class SegmentFrames(IterableDataset):
    """Items: ``{'job', 'index': [n], 'pixels': n x [3, 8, 224, 224]}`` (with ``raw``, possibly
    ``[8, H, W, 3]`` uint8 frames: ``decode_segments``), chunks of at most ``chunk``
    segments of one job, or ``{'job', 'error'}`` when its video fails (any error: one video never
    stops the others). ``order``: the jobs to do (default all); each worker takes whole jobs (worker w
    of W: ``order[w::W]``) and writes the one it is decoding into ``current[w]`` (shared memory), so
    that the main process knows which videos were being decoded when a worker died."""

    def __init__(self, jobs, chunk, raw=False, order=None, current=None):
        self.jobs, self.chunk, self.raw, self.current = jobs, chunk, raw, current
        self.order = range(len(jobs)) if order is None else order

    def __iter__(self):
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        threads = max(1, num_cpus() // nw)  # decoding threads (util.frames): the workers share the cores
        for j in self.order[wid::nw]:
            if self.current is not None:
                self.current[wid] = j
            index, pixels = [], []
            try:
                for i, x in job_segments(self.jobs[j], threads, shared=info is not None, raw=self.raw):
                    index.append(i)
                    pixels.append(x)
                    if len(pixels) == self.chunk or sum(p.nbytes for p in pixels) >= CHUNK_BYTES:
                        yield {'job': j, 'index': index, 'pixels': pixels}
                        index, pixels = [], []
            except Exception as e:  # noqa: BLE001 -- reported as this video's failure
                yield {'job': j, 'error': str(e) if isinstance(e, DecodeError) else f'{type(e).__name__}: {e}'}
                continue
            if pixels:
                yield {'job': j, 'index': index, 'pixels': pixels}


@torch.no_grad()
def embed(encoder, segments, batch_size, device, dtype):
    """Unit-norm embeddings ``[n, D]`` (float32, CPU) of ``n <= batch_size`` segments (each the model
    input ``[3, 8, 224, 224]``, or its untransformed ``[8, H, W, 3]`` uint8 frames, transformed here on
    ``device``, one segment at a time). The batch is always padded to ``batch_size`` so that every
    forward pass has the same shapes: a segment's embedding then does not depend on which other
    segments share its batch (a resumed run gives the same files as an uninterrupted one)."""
    def model_input(x):  # one segment's raw frames on the device at a time
        x = x.to(device, non_blocking=True)
        return (transform(x) if x.dtype == torch.uint8 else x).transpose(0, 1)

    frames = [model_input(x) for x in segments]
    frames += [frames[0].new_zeros(frames[0].shape)] * (batch_size - len(frames))
    # [B, 3, 8, H, W] viewing [B, 8, 3, H, W] memory: the model's reshape to frames is then free
    pixels = torch.stack(frames).transpose(1, 2)
    with torch.autocast(device.type, dtype=dtype, enabled=device.type == 'cuda' and dtype != torch.float32):
        return encoder(pixels)[:len(segments)].float().cpu()


class Batcher:
    """Segments of several videos in, forward passes of ``batch_size`` segments, and each video's
    ``[N, D]`` embeddings out as soon as all its segments are embedded. ``embed_fn(list of pixels)``
    gives the embeddings of at most ``batch_size`` segments."""

    def __init__(self, sizes, embed_fn, batch_size):
        self.out = {j: [None] * n for j, n in sizes.items()}  # embeddings being filled
        self.left = dict(sizes)  # segments of each video still to embed
        self.embed_fn, self.batch_size = embed_fn, batch_size
        self.queue = []  # (video, segment index, pixels) awaiting a forward pass

    def add(self, j, index, pixels):
        """Queue segments of video ``j``; returns ``[(video, embeddings)]`` of the videos finished."""
        self.queue.extend((j, i, x) for i, x in zip(index, pixels))
        done = []
        while len(self.queue) >= self.batch_size:
            done += self._run()
        return done

    def drop(self, j):
        """Forget video ``j`` (it failed, or it is to be decoded again)."""
        self.queue = [q for q in self.queue if q[0] != j]
        self.out.pop(j, None)
        self.left.pop(j, None)

    def flush(self):
        done = []
        while self.queue:
            done += self._run()
        return done

    def _run(self):
        take, self.queue = self.queue[:self.batch_size], self.queue[self.batch_size:]
        emb = self.embed_fn([x for _, _, x in take])
        done = []
        for (j, i, _), e in zip(take, emb):
            self.out[j][i] = e
            self.left[j] -= 1
            if self.left[j] == 0:
                del self.left[j]
                done.append((j, torch.stack(self.out.pop(j))))
        return done


def read_jobs(path):
    try:
        with open(path) as f:
            spec = json.load(f)
        jobs = spec['jobs']
        for job in jobs:
            for key in ('video_id', 'video_path', 'output_path', 'segments'):
                if key not in job:
                    raise KeyError(key)
    except FileNotFoundError:
        raise InputError(f'job file {path} not found (write it with prepare_paired_paths.py)') from None
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise InputError(f'{path} is not a job file of prepare_paired_paths.py ({type(e).__name__}: {e})') from None
    for n, job in enumerate(jobs, start=1):
        bad = bad_segment(job['segments'])
        if bad:  # a job without segments would never be written nor reported
            raise InputError(f'{path} job {n} (video {job["video_id"]}): {bad}')
    return spec, jobs


def bad_segment(segments):
    """Why ``segments`` (of a job) cannot be embedded, or None: a non-empty list of windows with
    numbers ``start < end``."""
    if not isinstance(segments, list) or not segments:
        return 'no segments'
    for k, s in enumerate(segments):
        times = [s.get(key) if isinstance(s, dict) else None for key in ('start', 'end')]
        if not all(type(t) in (int, float) for t in times) or not times[0] < times[1]:
            return f'segment {k} is not a window with numbers start < end: {s!r}'
    return None


def csv_text(failures):
    """The failures file's text: a header row, then one row per failed video."""
    out = io.StringIO()
    writer = csv.DictWriter(out, FAILURE_COLUMNS, lineterminator='\n')
    writer.writeheader()
    writer.writerows(failures)
    return out.getvalue()


def failures_path(job_file, spec, jobs):
    """``failed_<job file name>.csv`` beside the outputs (the job file's embedding folder)."""
    folder = spec.get('embedding_dir') or (os.path.dirname(jobs[0]['output_path']) if jobs else '.')
    return os.path.join(folder, f'failed_{os.path.splitext(os.path.basename(job_file))[0]}.csv')


def foreign_store_files(jobs, model_name, random_init):
    """``[(job, recorded model, recorded random_init)]`` of the jobs whose store file exists and was
    written by another encoder (unreadable files are simply redone)."""
    mine = '1' if random_init else '0'
    found = []
    for job in jobs:
        if os.path.isfile(job['output_path']):
            try:
                model, rand = store_encoder(job['output_path'])
            except EmbeddingError:
                continue
            if not (same_encoder(model, model_name) and rand == mine):
                found.append((job, model, rand))
    return found


def check_encoder(jobs, model_name, random_init, overwrite, log, complete=()):
    """Stop (or, with ``overwrite``, only say) when store files of these jobs hold another encoder's
    embeddings: one store must not mix encoders. ``complete``: the encoders of the complete files step 2
    left out of the job file (its ``complete_encoders``); another one among them always stops the run,
    as ``overwrite`` cannot re-embed videos that are not in the job file (files without ``model``
    metadata, converted from the original release, are not compared, as in step 4)."""
    rand = '1' if random_init else '0'  # as the store's metadata writes it
    mine = encoder_name(model_name, rand)
    others = [e for e in complete if e['model'] is not None and not (
        same_encoder(e['model'], model_name) and e['random_init'] == rand)]
    if others:
        raise InputError(f'{sum(e["files"] for e in others)} complete store file(s) that step 2 left out of '
                         f'this job file were written by another encoder: {others[0]["example"]} holds '
                         f'{encoder_name(others[0]["model"], others[0]["random_init"])}, this run uses {mine}. '
                         f'Move them away and rerun step 2 (their videos then become jobs), or write to '
                         f'another --embedding_dir')
    foreign = foreign_store_files(jobs, model_name, random_init)
    if not foreign:
        return
    job, model, rand = foreign[0]
    theirs = encoder_name(model, rand)
    if overwrite:
        log(f'--overwrite: re-embedding {len(foreign)} video(s) whose store file holds another encoder '
            f'(e.g. {job["output_path"]}: {theirs})')
        return
    raise InputError(f'{len(foreign)} store file(s) of this job file were written by another encoder: '
                     f'{job["output_path"]} holds {theirs}, this run uses {mine}. Pass --overwrite to '
                     f're-embed them, or write to another --embedding_dir (step 2)')


def write_store(job, emb, model_name, random_init, segment_sec):
    segs = job['segments']
    meta = {'video_id': job['video_id'], 'model': model_name, 'random_init': '1' if random_init else '0',
            'segment_sec': segment_sec, 'num_frames_per_segment': NUM_FRAMES}
    size = video_bytes(job['video_path'])
    if size is not None and not any(s.get('path') for s in segs):  # (not from --reencode segment files)
        meta['video_bytes'] = size  # steps 2 and 3 redo the video when its file changes size
    save_video_embeddings(job['output_path'], emb, [s['start'] for s in segs], [s['end'] for s in segs], meta)


def model_threads(threads=None):
    """CPU threads of the model: ``threads``, else half the cores this process may use (at least 1).
    Never derived from ``--num_workers``: the numerics of a CPU forward pass depend on the thread
    count, and files must not depend on the number of decoding workers."""
    return threads if threads else max(1, num_cpus() // 2)


def set_threads(device, threads=None):
    torch.set_num_threads(model_threads(threads))
    if device.type != 'cpu':
        os.environ.setdefault('CUBLAS_WORKSPACE_CONFIG', ':4096:8')  # deterministic cuBLAS
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = False


def without_pids(message):
    """A DataLoader's death message without its process ids (``DataLoader worker (pid(s) 123) exited
    unexpectedly`` -> ``DataLoader worker exited unexpectedly``): the failures file of a rerun on the
    same crashing video is then the same."""
    return re.sub(r' \(pids?(?:\(s\))? [\d, ]+\)', '', message)


def gather(obj, world):
    """Every rank's ``obj`` as a list (a one-item list in one process)."""
    if world == 1:
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


def main(args):
    global STARTED
    entered, STARTED = STARTED or time.time(), None  # later calls in the same process: from here
    if args.batch_size < 1 or args.num_workers < 0 or (args.threads is not None and args.threads < 1):
        raise InputError('need --batch_size >= 1, --num_workers >= 0 and --threads >= 1')
    rank, world = int(os.environ.get('RANK', 0)), int(os.environ.get('WORLD_SIZE', 1))
    device = torch.device(default_device(args.device))
    if device.type == 'cuda' and device.index is None:  # --device cuda under torchrun: this rank's GPU
        device = torch.device('cuda', int(os.environ.get('LOCAL_RANK', 0)))
    dtype = DTYPES[args.dtype]
    # = use_deterministic_algorithms(True, warn_only=True), without importing torch.compile's config
    # (2 s of start-up; nothing here is compiled)
    torch.set_deterministic_debug_mode('warn')
    set_threads(device, args.threads)
    log = print if rank == 0 else (lambda *a, **k: None)
    spec, all_jobs = read_jobs(args.video_path_file)
    share = all_jobs[rank::world]
    model_name = f'random_init:{args.random_init}' if args.random_init else args.model_path
    check_encoder(share, model_name, args.random_init, args.overwrite, log, spec.get('complete_encoders', []))
    jobs = [j for j in share
            if not is_complete(j['output_path'], j['segments'], model_name, args.random_init, j['video_path'])]
    skipped = len(share) - len(jobs)
    failure_file = failures_path(args.video_path_file, spec, all_jobs)
    # killed writes: also those of videos finished since, and of the failures and end-job files
    remove_stale_temporaries([j['output_path'] for j in share] + [failure_file]
                             + ([args.end_job_file] if args.end_job_file else []))
    log(f'{len(all_jobs)} jobs in {args.video_path_file}; rank {rank}/{world}: {len(share)} jobs, '
        f'{skipped} already complete, {len(jobs)} to do ({sum(len(j["segments"]) for j in jobs)} segments) '
        f'on {device}')

    start, first = time.time(), []  # work time: from here (decoding starts) to the last file written
    raw = args.transform_on == 'device' or (args.transform_on == 'auto' and device.type == 'cuda')

    sigchld = []  # DataLoader's SIGCHLD handler, put back at the end

    def decoding(order, num_workers):
        """The decoding workers of the jobs ``order`` (started now) and the job each is on."""
        current = multiprocessing.Array('q', [-1] * max(num_workers, 1), lock=False)
        dataset = SegmentFrames(jobs, CHUNK, raw, order, current)
        loader = iter(DataLoader(dataset, batch_size=None, num_workers=num_workers))
        if num_workers and threading.current_thread() is threading.main_thread():
            # DataLoader's SIGCHLD handler raises a worker's death at any point of this process (in the
            # middle of writing a file, of loading the model); without it, the next item raises it
            handler = signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            sigchld[:] = sigchld or [handler]
        return loader, current

    todo = list(range(len(jobs)))
    loader, current = decoding(todo, args.num_workers)
    encoder = load_encoder(args.model_path, args.random_init).to(device)
    if device.type == 'cuda':  # the first forward pass loads its kernels (0.4 s on an H200): now, while
        # the workers decode the first segments (no output depends on it)
        embed(encoder, [torch.zeros(NUM_FRAMES, SIZE, SIZE, 3, dtype=torch.uint8)], args.batch_size, device, dtype)
    model_load_s = time.time() - start
    if args.random_init:
        log(f'WARNING: random {args.random_init} encoder (testing only); files are marked random_init=1')

    def embed_batch(x):
        e = embed(encoder, x, args.batch_size, device, dtype)
        if not first:
            first.append(time.time())
        return e

    def new_batcher(todo):
        return Batcher({j: len(jobs[j]['segments']) for j in todo}, embed_batch, args.batch_size)

    batcher = new_batcher(todo)
    failed, done = {}, set()  # job -> reason; jobs written or failed
    bar = tqdm(total=sum(len(j['segments']) for j in jobs), unit='seg', desc=f'rank {rank}', position=rank,
               disable=None)
    written, segments, minutes = 0, 0, 0.0

    def fail(j, reason):
        failed[j] = reason
        done.add(j)
        batcher.drop(j)
        bar.total -= len(jobs[j]['segments'])
        tqdm.write(f'failed {jobs[j]["video_id"]}: {reason}')

    def finish(finished):
        nonlocal written, segments, minutes
        for j, emb in finished:
            job = jobs[j]
            try:
                write_store(job, emb, model_name, args.random_init, spec.get('segment_sec', ''))
            except (OSError, ValueError) as e:  # e.g. a name the file system refuses, a full disk
                fail(j, f'cannot write {job["output_path"]} ({type(e).__name__}: {e})')
                continue
            done.add(j)
            written, segments = written + 1, segments + len(job['segments'])
            minutes += float(job.get('duration') or job['segments'][-1]['end']) / 60
            bar.update(len(job['segments']))

    def consume(loader):
        """Embed and write what ``loader`` decodes. Returns None, or the message of the error when a
        decoding process died (FFmpeg crashed on a file, the out-of-memory killer)."""
        try:
            for item in loader:
                if 'error' in item:  # drop what was decoded or embedded of this video
                    fail(item['job'], item['error'])
                else:
                    finish(batcher.add(item['job'], item['index'], item['pixels']))
            finish(batcher.flush())
        except RuntimeError as e:
            if 'DataLoader worker (pid' not in str(e):
                raise
            return str(e).strip().splitlines()[0]
        except (EOFError, ConnectionError) as e:  # an item's tensors are received from the worker that
            # sent it (file descriptors over a socket): it died meanwhile, before it could be seen dead
            return f'DataLoader worker died while its data was received ({type(e).__name__})'
        return None

    while (crash := consume(loader)) is not None:
        suspects = [j for j in current if j >= 0 and j not in done]
        loader = None  # shuts the other workers down
        if not suspects:
            raise RuntimeError(crash)
        tqdm.write(f'a decoding process died ({crash}); decoding the {len(suspects)} video(s) it may have been '
                   f'on one at a time')
        todo = [j for j in todo if j not in done]
        batcher = new_batcher(todo)  # the videos under way are decoded again
        for j in suspects:  # each alone in a process of its own: the video that kills it again fails
            # (unless it was written first: the process died after handing out its last segment)
            if (alone := consume(decoding([j], 1)[0])) is not None and j not in done:
                fail(j, f'its decoding process died ({without_pids(alone)})')
        todo = [j for j in todo if j not in done]
        loader, current = decoding(todo, args.num_workers)
    bar.close()
    if sigchld:  # (no worker of this run is left)
        signal.signal(signal.SIGCHLD, sigchld[0])

    totals = torch.tensor([len(share), skipped, written, len(failed), segments, minutes], dtype=torch.float64)
    failures = [dict(video_id=jobs[j]['video_id'], video_path=jobs[j]['video_path'], reason=r)
                for j, r in failed.items()]
    if world > 1:  # sum over ranks; this also makes rank 0 wait for every rank before the end file
        dist.init_process_group('gloo', timeout=datetime.timedelta(days=7))
        dist.all_reduce(totals)
        failures = [f for part in gather(failures, world) for f in part]
        dist.destroy_process_group()
    elapsed = time.time() - start
    n_jobs, n_skip, n_written, n_failed, n_seg = (int(v) for v in totals[:5])
    summary = {'jobs': n_jobs, 'already_complete': n_skip, 'written': n_written, 'failed': n_failed,
               'failures_file': failure_file, 'segments': n_seg, 'seconds': round(elapsed, 2),
               'model_load_s': round(model_load_s, 2), 'first_batch_s': round(first[0] - entered, 2) if first else None,
               'total_s': round(time.time() - entered, 2),
               'segments_per_s': round(n_seg / elapsed, 2),
               'video_minutes_per_min': round(float(totals[5]) / (elapsed / 60), 2)}
    if rank == 0:
        failures.sort(key=lambda f: f['video_id'])
        atomic_write_text(failure_file, csv_text(failures))
        for f in failures[:20]:
            print(f'FAILED {f["video_id"]}: {f["reason"]}')
        if args.end_job_file:
            atomic_write_text(args.end_job_file, json.dumps(summary) + '\n')
    log('summary: ' + json.dumps(summary))
    log(f'{n_failed} video(s) failed' + (f', listed in {failure_file}' if n_failed else ''))
    if args.strict and n_failed:
        sys.exit(1)
    return summary


if __name__ == '__main__':
    run_main(main, get_args_parser().parse_args())
