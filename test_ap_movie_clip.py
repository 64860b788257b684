"""Attentive probing of a frozen LV-MAE encoder (docs/EVAL.md; main_probe.py, engine_probe.py).

    python test_ap_movie_clip.py --batch_size 16 --task scene --epochs 30 --lr 3e-4 \
        --resume checkpoint-150.pth --data_path data/lvu
Paper's schedule: --lr 1e-3 --sched exp --lr_decay 0.9 --epochs 20. Baselines: --baseline raw (no
encoder), --baseline random_init (the checkpoint's architecture, untrained).
"""
from main_probe import get_args_parser, main
from util.errors import run_main

if __name__ == '__main__':
    run_main(main, get_args_parser('ap').parse_args())
