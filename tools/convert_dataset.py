"""Convert a detection data set (COCO, Pascal VOC, ILSVRC DET, folder of images + VOC XML) to COCO JSON.

    python tools/convert_dataset.py ../shared/data/fruit/train --out runs/data/fruit_train.json
    python tools/convert_dataset.py ../shared/data/raccoon \
        --names-file ../shared/data/raccoon/data/test_labels.csv --out runs/data/raccoon_test.json
    python tools/convert_dataset.py VOCdevkit/VOC2007 --image-set test --out voc07_test.json
    python tools/convert_dataset.py mydata --image-root mydata/pics --annotations mydata/xml \
        --classes cat,dog --out runs/data/mydata.json
    python tools/convert_dataset.py ILSVRC --image-set val --synsets ILSVRC/devkit/data/meta_det.mat \
        --out det_val.json

Boxes are repaired on the way (clipped, degenerate ones dropped, sizes taken from the images) and
the report of what was fixed is printed. ``file_name``s are written relative to the images'
common folder, which is recorded as ``info.image_root``.
"""

from __future__ import annotations

import argparse
import logging
import sys

from backbone.bad_images import ON_BAD_IMAGE
from backbone.runtime import run_tool, setup_logging
from detect.datasets import class_list, open_detection_dataset, write_coco_json

logger = logging.getLogger("convert_dataset")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("source", help="COCO .json, VOC year dir, ILSVRC root, or folder of images + XML")
    parser.add_argument("--out", required=True, help="output COCO JSON path")
    parser.add_argument(
        "--image-set", help="VOC ImageSets/Main set (required for VOC) or ILSVRC list (default val)"
    )
    parser.add_argument("--names-file", help="folder layouts: split list (.csv with 'filename' or .txt)")
    parser.add_argument(
        "--classes",
        type=class_list,
        help="VOC / folder layouts: comma-separated class names in label order "
        "(default: VOC's 20 for a VOC<year> folder, else the names found, sorted)",
    )
    parser.add_argument("--synsets", help="ILSVRC: meta_det.mat or 'WNID [INDEX] NAME' text mapping")
    parser.add_argument(
        "--image-root", help="folder of the images: COCO (default: beside the JSON), folder layouts (found)"
    )
    parser.add_argument("--annotations", help="folder layouts: folder of the XML files (default: found)")
    parser.add_argument(
        "--relative-to", help="write file_names relative to this folder (default: common folder)"
    )
    parser.add_argument(
        "--skip-errors", action="store_true", help="skip bad files (counted) instead of stopping"
    )
    parser.add_argument(
        "--on-bad-image",
        choices=ON_BAD_IMAGE,
        default="skip",
        help="an image file that is empty, a directory, not an image or too large: skip it (named in "
        "the report) or stop with an error (backbone/bad_images.py)",
    )
    return parser


def main(args: argparse.Namespace) -> None:
    setup_logging()
    dataset, report = open_detection_dataset(
        args.source,
        image_set=args.image_set,
        class_names=args.classes,
        image_root=args.image_root,
        annotations=args.annotations,
        names_file=args.names_file,
        synsets=args.synsets,
        on_error="skip" if args.skip_errors else "raise",
        on_bad_image=args.on_bad_image,
    )
    report.log(logger)
    path = write_coco_json(dataset, args.out, image_root=args.relative_to)
    boxes = sum(len(r.labels) for r in dataset.records)
    print(f"wrote {path}: {len(dataset.records)} images, {boxes} boxes, {len(dataset.class_names)} classes")


if __name__ == "__main__":
    sys.exit(run_tool(main, get_args_parser().parse_args()))
