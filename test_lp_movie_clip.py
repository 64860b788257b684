"""Linear probing of a frozen LV-MAE encoder: a linear layer on the mean of the encoder outputs over
the real segments (DESIGN.md section 5; engine in engine_probe.py).

    python test_lp_movie_clip.py --batch_size 16 --task scene --epochs 30 --lr 3e-4 \
        --resume checkpoint-150.pth --data_path data/lvu
Paper's setting: --lr 1e-4 --epochs 30. Raw-embedding baseline: --baseline raw.
"""
from engine_probe import get_args_parser, main

if __name__ == '__main__':
    main(get_args_parser('lp').parse_args())
