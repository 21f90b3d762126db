"""Print the paper's Table 1 computed from the model: python tools/model_summary.py --variant paper"""

from __future__ import annotations

import argparse

from backbone import VARIANTS, googlenet
from backbone.summary import compute_table1, format_table1


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--variant", choices=VARIANTS, default="paper")
    parser.add_argument("--num-classes", type=int, default=1000)
    parser.add_argument("--image-size", type=int, default=224)
    return parser


def main(args: argparse.Namespace) -> None:
    model = googlenet(args.variant, num_classes=args.num_classes, aux_logits=False, init_weights=False)
    print(f"GoogLeNet, variant {args.variant!r}, {args.image_size}x{args.image_size} input")
    print(format_table1(compute_table1(model, args.image_size)))


if __name__ == "__main__":
    main(get_args_parser().parse_args())
