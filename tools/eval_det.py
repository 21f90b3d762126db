"""Score saved detections (COCO results JSON) against ground truth; print per-class AP and mAP.

    python tools/eval_det.py --gt GT --dets DETS.json --metric coco|voc07|voc|ilsvrc [--out DIR]

GT is a COCO JSON or a data set directory (VOC year dir with --image-set, ILSVRC root, folder of
images + XML). Writes DIR/metrics.json and DIR/pr/pr_<index>_<class>.png (one precision-recall
curve per class). With a COCO JSON as GT, ``coco`` runs pycocotools on that file exactly as given.

Scoring needs only the annotations: the image files may be absent (evaluating on a machine without
the image folder). An image that is there is read for its true size, as in training; one that is
not takes the size its annotation records (COCO ``width``/``height``, VOC ``<size>``), and only an
absent image whose annotation has no size (or 0x0) and which has boxes is an error.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import numpy as np

from backbone.bad_images import ON_BAD_IMAGE
from backbone.runtime import run_tool, setup_logging
from backbone.runtime.files import atomic_write_text
from detect.datasets import DatasetError, class_list, dataset_to_coco, detect_format, open_detection_dataset
from detect.datasets.coco import load_json
from detect.evaluation import (
    METRICS,
    detections_from_coco_results,
    evaluate_coco,
    evaluate_pascal,
    ground_truth_arrays,
)
from detect.visualize import save_pr_curves

logger = logging.getLogger("eval_det")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--gt", required=True, help="COCO JSON or VOC / ILSVRC / folder data set directory")
    parser.add_argument(
        "--dets", required=True, help="COCO results JSON [{image_id, category_id, bbox, score}]"
    )
    parser.add_argument("--metric", choices=METRICS, default="voc")
    parser.add_argument(
        "--iou", type=float, default=0.5, help="IoU threshold for voc07/voc (ILSVRC: the cap)"
    )
    parser.add_argument("--out", default="runs/eval_det", help="output directory (metrics.json, pr/*.png)")
    parser.add_argument("--no-plots", action="store_true", help="skip the per-class PR curve PNGs")
    parser.add_argument("--image-set", help="VOC ImageSets/Main set or ILSVRC list (default val)")
    parser.add_argument("--names-file", help="folder layouts: split list (.csv with 'filename' or .txt)")
    parser.add_argument(
        "--classes",
        type=class_list,
        help="VOC / folder layouts: comma-separated class names in label order "
        "(default: VOC's 20 for a VOC<year> folder, else the names found, sorted)",
    )
    parser.add_argument("--synsets", help="ILSVRC: meta_det.mat or 'WNID [INDEX] NAME' text mapping")
    parser.add_argument("--image-root", help="folder of the GT images: COCO or folder layouts (optional)")
    parser.add_argument("--annotations", help="folder layouts: folder of the XML files (default: found)")
    parser.add_argument(
        "--on-bad-image",
        choices=ON_BAD_IMAGE,
        default="skip",
        help="a GT image file that does not read: its annotated size is used, else it is skipped "
        "(named) or, with error, stops (backbone/bad_images.py)",
    )
    return parser


def main(args: argparse.Namespace) -> None:
    setup_logging()
    dataset, report = open_detection_dataset(
        args.gt,
        image_set=args.image_set,
        class_names=args.classes,
        image_root=args.image_root,
        annotations=args.annotations,
        names_file=args.names_file,
        synsets=args.synsets,
        require_images=False,
        on_bad_image=args.on_bad_image,
    )
    report.log(logger)
    results = load_json(args.dets)
    dets = detections_from_coco_results(results, dataset.category_ids, args.dets)
    known = np.asarray(sorted(r.image_id for r in dataset.records), np.int64)
    unknown = dets.image_ids[~np.isin(dets.image_ids, known)]
    if unknown.size:
        raise DatasetError(args.dets, f"image id {int(unknown[0])} is not in the ground truth {args.gt}")
    if args.metric == "coco":
        # A COCO file is scored as is (areas, crowd regions); other layouts through their records.
        gt_coco = load_json(args.gt) if detect_format(args.gt, args.annotations) == "coco" else None
        if gt_coco is None:
            gt_coco = dataset_to_coco(dataset)
        result = evaluate_coco(gt_coco, results, dataset.class_names, dataset.category_ids)
        print(result.summary_text)
    else:
        result = evaluate_pascal(ground_truth_arrays(dataset), dets, args.metric, args.iou)
    print(result.table())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summary = result.to_json_dict() | {"gt": str(args.gt), "dets": str(args.dets), "num_images": len(known)}
    atomic_write_text(out / "metrics.json", json.dumps(summary, indent=2))
    if not args.no_plots:
        save_pr_curves(result.curves, result.ap, result.class_names, out / "pr", title=args.metric)
    print(f"wrote {out / 'metrics.json'}" + ("" if args.no_plots else f" and {out / 'pr'}/*.png"))


if __name__ == "__main__":
    sys.exit(run_tool(main, get_args_parser().parse_args()))
