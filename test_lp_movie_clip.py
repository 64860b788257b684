"""Linear probing of a frozen LV-MAE encoder: a linear layer on the mean of the encoder outputs over
the real segments (docs/EVAL.md; main_probe.py, engine_probe.py).

    python test_lp_movie_clip.py --batch_size 16 --task scene --epochs 30 --lr 3e-4 \
        --resume checkpoint-150.pth --data_path data/lvu
Paper's setting: --lr 1e-4 --epochs 30. Baselines: --baseline raw (no encoder), --baseline
random_init (the checkpoint's architecture, untrained).
"""
from main_probe import get_args_parser, main
from util.errors import run_main

if __name__ == '__main__':
    run_main(main, get_args_parser('lp').parse_args())
