"""Throughput of the LanguageBind video encoder alone (step 3's model call, no decoding).

    python bench/bench_encoder.py --config huge --device cuda --dtype bf16 --batch_size 64

Randomly initialised weights of step 3's encoder (``models_langbind.VideoEncoder``; ``--config huge``
has the size of LanguageBind_Video_Huge: ViT-H/14 with temporal attention, 8 frames of 224x224), so the figure is the
encoder's speed, not a result. One JSON line per batch size: segments per second and peak GPU memory.
"""
import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from util.langbind import RANDOM_CONFIGS, load_encoder  # noqa: E402


def main():
    p = argparse.ArgumentParser('LanguageBind encoder throughput')
    p.add_argument('--config', default='tiny', choices=sorted(RANDOM_CONFIGS))
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    p.add_argument('--dtype', default='bf16', choices=['fp32', 'bf16'])
    p.add_argument('--batch_size', default=[32], type=int, nargs='+')
    p.add_argument('--steps', default=5, type=int, help='timed batches per batch size')
    p.add_argument('--warmup', default=2, type=int)
    args = p.parse_args()

    device = torch.device(args.device)
    model = load_encoder(random_init=args.config).to(device)
    for bs in args.batch_size:
        x = torch.randn(bs, 3, 8, 224, 224, device=device)
        if device.type == 'cuda':
            torch.cuda.reset_peak_memory_stats()
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.dtype == 'bf16'):
            for i in range(args.warmup + args.steps):
                if i == args.warmup:
                    if device.type == 'cuda':
                        torch.cuda.synchronize()
                    t0 = time.perf_counter()
                model(x)
            if device.type == 'cuda':
                torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        line = {'measure': 'encoder', 'config': args.config, 'device': torch.cuda.get_device_name(device)
                if device.type == 'cuda' else 'cpu', 'dtype': args.dtype, 'batch_size': bs,
                'segments_per_s': round(bs * args.steps / dt, 1)}
        if device.type == 'cuda':
            line['peak_mem_gb'] = round(torch.cuda.max_memory_allocated(device) / 2 ** 30, 2)
        print(json.dumps(line), flush=True)


if __name__ == '__main__':
    main()
