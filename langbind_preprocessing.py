"""Step 3: LanguageBind video embeddings of every segment in a job file (step 2), one store file per video.

DataLoader workers decode the videos (each long video opened once, only the 8 frames per segment
that are used converted and shrunk); the main process runs the vision tower on batches of
``--batch_size`` segments taken from several videos and writes a video's file (atomically) as soon
as all its segments are embedded. Finished videos are skipped, so a killed run is resumed by
running the same command again. Under ``torchrun --nproc_per_node N`` rank r takes jobs r, r+N, ...

    python langbind_preprocessing.py --video_path_file data/lvu_segments/paired_paths.json \
        --model_path checkpoints/LanguageBind_Video_Huge_V1.5_FT
"""
import argparse
import datetime
import glob
import json
import os
import sys
import time

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from tqdm import tqdm

from prepare_paired_paths import is_complete
from util.embeddings import save_video_embeddings
from util.fileio import atomic_write_text
from util.frames import NUM_FRAMES, DecodeError, decode_segments
from util.langbind import DEFAULT_MODEL, RANDOM_CONFIGS, load_encoder

DTYPES = {'fp32': torch.float32, 'bf16': torch.bfloat16, 'fp16': torch.float16}
CHUNK = 8  # segments per item a worker sends (4.8 MB each in shared memory)


def get_args_parser():
    parser = argparse.ArgumentParser('LanguageBind segment embeddings', add_help=True)
    parser.add_argument('--video_path_file', required=True, help='job file written by prepare_paired_paths.py')
    parser.add_argument('--model_path', default=DEFAULT_MODEL,
                        help='local LanguageBind video checkpoint folder, or a hub name where the hub is reachable')
    parser.add_argument('--random_init', default=None, choices=sorted(RANDOM_CONFIGS),
                        help='use a randomly initialised encoder of this size (fixed seed; for tests, demos '
                             'and timing only: its files carry random_init=1)')
    parser.add_argument('--batch_size', default=64, type=int, help='segments per forward pass')
    parser.add_argument('--device', default='auto', help='auto (cuda when available), cpu, cuda or cuda:N')
    parser.add_argument('--dtype', default='bf16', choices=sorted(DTYPES),
                        help='autocast precision on GPU (on CPU the model always runs in fp32)')
    parser.add_argument('--num_workers', default=2, type=int, help='decoding processes (0: decode in this process)')
    parser.add_argument('--end_job_file', default=None,
                        help='file written when every job of the job file has been processed (a summary, JSON)')
    return parser


def num_cpus():
    """Cores this process may use (os.sched_getaffinity is Linux-only)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count() or 1


def job_segments(job, threads=1):
    """``(segment index, [3, 8, 224, 224])`` of one job: segments with a ``path`` from that file
    (the original release's re-encoded layout), the others from the long video, decoded once."""
    segs = job['segments']
    for i, s in enumerate(segs):
        if s.get('path'):
            for _, x in decode_segments(s['path'], threads=threads):
                yield i, x
    windows = [i for i, s in enumerate(segs) if not s.get('path')]
    if windows:
        spans = [(segs[i]['start'], segs[i]['end']) for i in windows]
        for k, x in decode_segments(job['video_path'], spans, threads=threads):
            yield windows[k], x


class SegmentFrames(IterableDataset):
    """Items: ``{'job', 'index': [n], 'pixels': n x [3, 8, 224, 224]}``, chunks of at most ``chunk``
    segments of one job, or ``{'job', 'error'}`` when its video fails to decode. Each worker takes
    whole jobs (worker w of W: jobs w, w+W, ...)."""

    def __init__(self, jobs, chunk):
        self.jobs, self.chunk = jobs, chunk

    def __iter__(self):
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        threads = max(1, num_cpus() // nw)  # FFmpeg threads: the workers share the cores
        for j in range(wid, len(self.jobs), nw):
            index, pixels = [], []
            try:
                for i, x in job_segments(self.jobs[j], threads):
                    index.append(i)
                    pixels.append(x)
                    if len(pixels) == self.chunk:
                        yield {'job': j, 'index': index, 'pixels': pixels}
                        index, pixels = [], []
            except DecodeError as e:
                yield {'job': j, 'error': str(e)}
                continue
            if pixels:
                yield {'job': j, 'index': index, 'pixels': pixels}


@torch.no_grad()
def embed(encoder, segments, batch_size, device, dtype):
    """Unit-norm embeddings ``[n, D]`` (float32, CPU) of ``n <= batch_size`` segments (``[3, 8, 224, 224]``
    each). The batch is always padded to ``batch_size`` so that every forward pass has the same shapes:
    a segment's embedding then does not depend on which other segments share its batch (a resumed run
    gives the same files as an uninterrupted one)."""
    frames = [x.transpose(0, 1) for x in segments]
    frames += [frames[0].new_zeros(frames[0].shape)] * (batch_size - len(frames))
    # [B, 3, 8, H, W] viewing [B, 8, 3, H, W] memory: the model's reshape to frames is then free
    pixels = torch.stack(frames).transpose(1, 2).to(device, non_blocking=True)
    with torch.autocast(device.type, dtype=dtype, enabled=device.type == 'cuda' and dtype != torch.float32):
        return encoder(pixels)[:len(segments)].float().cpu()


def pick_device(name, local_rank):
    if name == 'auto':
        name = 'cuda' if torch.cuda.is_available() else 'cpu'
    device = torch.device(name)
    if device.type == 'cuda' and device.index is None:
        device = torch.device('cuda', local_rank)
    return device


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
        sys.exit(f'error: job file {path} not found (write it with prepare_paired_paths.py)')
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        sys.exit(f'error: {path} is not a job file of prepare_paired_paths.py ({type(e).__name__}: {e})')
    return spec, jobs


def write_store(job, emb, model_name, random_init, segment_sec):
    segs = job['segments']
    meta = {'video_id': job['video_id'], 'model': model_name, 'random_init': '1' if random_init else '0',
            'segment_sec': segment_sec, 'num_frames_per_segment': NUM_FRAMES}
    save_video_embeddings(job['output_path'], emb, [s['start'] for s in segs], [s['end'] for s in segs], meta)
    # temporary files left by a run killed while writing this store file
    out = job['output_path']
    for tmp in glob.glob(os.path.join(glob.escape(os.path.dirname(out) or '.'),
                                      '.' + glob.escape(os.path.basename(out)) + '.*.tmp')):
        os.remove(tmp)


def main(args):
    if args.batch_size < 1 or args.num_workers < 0:
        sys.exit('error: need --batch_size >= 1 and --num_workers >= 0')
    rank, world = int(os.environ.get('RANK', 0)), int(os.environ.get('WORLD_SIZE', 1))
    device = pick_device(args.device, int(os.environ.get('LOCAL_RANK', 0)))
    dtype = DTYPES[args.dtype]
    torch.use_deterministic_algorithms(True, warn_only=True)
    if device.type == 'cpu':
        if args.num_workers:  # leave the decoding workers their cores
            torch.set_num_threads(max(1, num_cpus() - args.num_workers))
    else:
        os.environ.setdefault('CUBLAS_WORKSPACE_CONFIG', ':4096:8')  # deterministic cuBLAS
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = False
    spec, all_jobs = read_jobs(args.video_path_file)
    share = all_jobs[rank::world]
    jobs = [j for j in share if not is_complete(j['output_path'], j['segments'])]
    skipped = len(share) - len(jobs)
    log = print if rank == 0 else (lambda *a, **k: None)
    log(f'{len(all_jobs)} jobs in {args.video_path_file}; rank {rank}/{world}: {len(share)} jobs, '
        f'{skipped} already complete, {len(jobs)} to do ({sum(len(j["segments"]) for j in jobs)} segments) '
        f'on {device}')

    model_name = f'random_init:{args.random_init}' if args.random_init else args.model_path
    encoder = load_encoder(args.model_path, args.random_init).to(device)
    if args.random_init:
        log(f'WARNING: random {args.random_init} encoder (testing only); files are marked random_init=1')

    loader = DataLoader(SegmentFrames(jobs, CHUNK), batch_size=None, num_workers=args.num_workers)
    out = {j: [None] * len(job['segments']) for j, job in enumerate(jobs)}  # embeddings being filled
    left = {j: len(job['segments']) for j, job in enumerate(jobs)}
    failed, queue = {}, []  # queue: (job, segment index, pixels [3, 8, 224, 224]) awaiting a forward pass
    bar = tqdm(total=sum(left.values()), unit='seg', desc=f'rank {rank}', position=rank, disable=None)
    start, written, segments, minutes = time.time(), 0, 0, 0.0

    def run_batch():
        nonlocal written, segments, minutes
        take = queue[:args.batch_size]
        del queue[:args.batch_size]
        emb = embed(encoder, [x for _, _, x in take], args.batch_size, device, dtype)
        for (j, i, _), e in zip(take, emb):
            out[j][i] = e
            left[j] -= 1
            if left[j] == 0:
                write_store(jobs[j], torch.stack(out.pop(j)), model_name, args.random_init,
                            spec.get('segment_sec', ''))
                written, segments = written + 1, segments + len(jobs[j]['segments'])
                minutes += float(jobs[j].get('duration') or jobs[j]['segments'][-1]['end']) / 60
        bar.update(len(take))

    for item in loader:
        j = item['job']
        if 'error' in item:  # drop what was decoded or embedded of this video
            failed[j] = item['error']
            queue[:] = [q for q in queue if q[0] != j]
            bar.total -= left.pop(j)
            out.pop(j)
            tqdm.write(f'skipped {jobs[j]["video_id"]}: {item["error"]}')
            continue
        queue.extend((j, i, x) for i, x in zip(item['index'], item['pixels']))
        while len(queue) >= args.batch_size:
            run_batch()
    while queue:
        run_batch()
    bar.close()

    totals = torch.tensor([len(share), skipped, written, len(failed), segments, minutes], dtype=torch.float64)
    if world > 1:  # sum over ranks; this also makes rank 0 wait for every rank before the end file
        dist.init_process_group('gloo', timeout=datetime.timedelta(days=7))
        dist.all_reduce(totals)
        dist.destroy_process_group()
    elapsed = time.time() - start
    for j, msg in failed.items():
        print(f'FAILED {jobs[j]["video_id"]}: {msg}')
    n_jobs, n_skip, n_written, n_failed, n_seg = (int(v) for v in totals[:5])
    summary = {'jobs': n_jobs, 'already_complete': n_skip, 'written': n_written, 'failed': n_failed,
               'segments': n_seg, 'seconds': round(elapsed, 1), 'segments_per_s': round(n_seg / elapsed, 2),
               'video_minutes_per_min': round(float(totals[5]) / (elapsed / 60), 2)}
    log('summary: ' + json.dumps(summary))
    if rank == 0 and args.end_job_file:
        atomic_write_text(args.end_job_file, json.dumps(summary) + '\n')
    return summary


if __name__ == '__main__':
    main(get_args_parser().parse_args())
