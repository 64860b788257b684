"""Attentive probing of a frozen LV-MAE encoder (DESIGN.md section 5; engine in engine_probe.py).

    python test_ap_movie_clip.py --batch_size 16 --task scene --epochs 30 --lr 3e-4 \
        --resume checkpoint-150.pth --data_path data/lvu
Paper's schedule: --lr 1e-3 --lr_decay 0.9 --epochs 20. Raw-embedding baseline: --baseline raw.
"""
from engine_probe import get_args_parser, main

if __name__ == '__main__':
    main(get_args_parser('ap').parse_args())
