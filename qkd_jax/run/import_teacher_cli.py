"""Command line: a torchvision weights file turned into a finished teacher phase.

    python -m qkd_jax.import_teacher --weights=resnet18-f37072fd.pth --model=resnet18 \
        --out=/tmp/in_r18_teacher [--config=configs/imagenet_resnet18.py:sqakd,w4a4]
    python -m qkd_jax.main --config=configs/imagenet_resnet18.py:sqakd,w4a4 --workdir=/tmp/in_r18_sqakd \
        --config.teacher_checkpoint=/tmp/in_r18_teacher

.npz and .safetensors are read without torch; .pth / .pt need torch. Without --config the record is
that of the ImageNet FP recipe of --model (which every ImageNet config's teacher phase shares).
Errors (unknown model, a classifier for another class count, an OUT that already holds a
checkpoint, a missing weights file, a .pth without torch) print one line and exit 2.
Code: qkd_jax/run/import_teacher.py.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m qkd_jax.import_teacher",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", required=True, help="torchvision state_dict: .pth, .safetensors or .npz")
    parser.add_argument("--model", required=True, help="zoo model name (e.g. resnet18)")
    parser.add_argument("--out", required=True, help="new directory for the teacher phase checkpoint")
    parser.add_argument("--config", default=None,
                        help="the config the runs will use (configs/X.py[:ARG]); default: ImageNet FP recipe")
    parser.add_argument("--num_classes", type=int, default=None, help="class count (default: the config's)")
    parser.add_argument("--no_eval", action="store_true", help="skip evaluating on the eval split")
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.ERROR)  # orbax's notes on checkpoint metadata
    from qkd_jax.run.import_teacher import ImportTeacherError, import_teacher

    try:
        out = import_teacher(args.weights, args.out, model=args.model, num_classes=args.num_classes,
                             config=args.config, evaluate_teacher=not args.no_eval)
    except (ImportTeacherError, FileNotFoundError) as err:
        print("error: " + " ".join(line.strip() for line in str(err).splitlines()), file=sys.stderr)
        return 2
    print(f"use it with: --config.teacher_checkpoint={out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
