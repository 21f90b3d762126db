"""Compute (or complete) the cached region proposals of a data set split, and report their coverage.

    python tools/propose.py --config configs/det/proposals_fruit.yaml --split test [--set ss.min_size=10]
    python tools/propose.py --config configs/det/proposals_fruit.yaml --split test --report [--out DIR]
    torchrun --nproc_per_node=2 tools/propose.py --config ... --split train

The config's proposal keys (``method``, ``ss``, ``multibox``, ``union_dedup_iou``, ``cache_dir``,
``workers``, ``shard_size``) are detect/proposals/spec.py's ProposalSpec at the top level, so the caches
are the ones train_det and test_det look for. ``method`` is ``ss`` (selective search), ``multibox`` or
``both`` (MultiBox's top boxes, then selective search, near-duplicates removed). Caches live in
``cache_dir/<name>/<split>/<method>``, fingerprinted by method, parameters and images: a stale cache
is rebuilt (with a warning), an interrupted run continues where it stopped. ``--report`` computes the
paper's comparison (SS fast, SS x2, MultiBox, SS x2 + MultiBox) and writes report.txt, report.json and
recall_curves.png to ``--out`` (default ``runs/<config stem>/report_<split>``). Without a MultiBox
model (no ``multibox.model``, or its file not trained yet) the report has the selective search rows
alone, and says why in the log and the report.
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Literal

from backbone.bad_images import BadImages, OnBadImage
from backbone.runtime import config as cfglib
from backbone.runtime.dist import barrier, cleanup_distributed, init_distributed, is_main_process
from backbone.runtime.errors import UserError
from backbone.runtime.log import run_tool, setup_logging
from backbone.runtime.paths import default_run_dir, resolve_data_path
from detect.datasets import DetectionDataset
from detect.datasets.spec import DatasetSpec, open_dataset_spec
from detect.proposals.cache import build_cache, load_cache
from detect.proposals.methods import ProposalMethod, cores_per_rank
from detect.proposals.report import coverage_stats, write_report
from detect.proposals.selective_search import filter_ranked_boxes
from detect.proposals.shards import LazyProposals
from detect.proposals.spec import ProposalSpec, plan_caches

logger = logging.getLogger("propose")


@dataclass(frozen=True)
class ProposeConfig(ProposalSpec):
    """The proposal section (detect/proposals/spec.py) at the top level, with this tool's defaults
    (``both``, dedup 0.8, ``cache/proposals``), plus the data set's splits and the report baseline."""

    method: Literal["ss", "multibox", "both"] = "both"
    union_dedup_iou: float = 0.8
    cache_dir: str = "cache/proposals"
    name: str = "dataset"
    splits: dict[str, DatasetSpec] = field(default_factory=dict)
    report_baseline: str = "fast"  # the plain selective search the report compares against
    on_bad_image: OnBadImage = "skip"  # skip (recorded in the cache) or error: backbone/bad_images.py

    def proposals(self) -> ProposalSpec:
        return ProposalSpec(**{f.name: getattr(self, f.name) for f in fields(ProposalSpec)})


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", type=Path, required=True, help="YAML config")
    parser.add_argument("--split", required=True, help="a key of the config's 'splits'")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--report", action="store_true", help="compute every method and report coverage")
    parser.add_argument("--out", type=Path, default=None, help="report directory")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    return parser


def load_split(cfg: ProposeConfig, split: str) -> DetectionDataset:
    spec = cfg.splits[split]
    dataset, report = open_dataset_spec(spec, cfg.on_bad_image)
    logger.info("%s/%s: %d images", cfg.name, split, len(dataset.records))
    report.log(logger)  # what was fixed, kept or skipped, naming the first few files
    return dataset


def report_rows(records, sets: dict[str, LazyProposals], baseline: str, dedup_iou: float) -> dict[str, dict]:
    rows = {name: coverage_stats(records, s.boxes, s.seconds) for name, s in sets.items()}
    # Fairness check: the union removes near-duplicates, so show the baseline with the same removal.
    base = sets[baseline]
    deduped = (b[filter_ranked_boxes(b, 0.0, dedup_iou, None)] for b in base.boxes)  # one image at a time
    rows[f"{baseline} (dedup {dedup_iou:g}, reference)"] = coverage_stats(records, deduped, base.seconds)
    return rows


def main(args: argparse.Namespace) -> int:
    cfg = cfglib.load_config(args.config, ProposeConfig, args.overrides)
    info = init_distributed("cpu")
    try:
        return propose(cfg, args, info.world_size)
    finally:
        cleanup_distributed()


def plan(
    cfg: ProposeConfig, split: str, report: bool
) -> tuple[dict[str, tuple[Path, ProposalMethod]], list[str]]:
    """The caches to build (settings errors surface here, before the data set is read), and notes
    for the report: a report without a MultiBox model covers selective search alone."""
    spec = cfg.proposals()
    notes = []
    model = spec.multibox.model
    if report and model is None:
        notes.append("no multibox.model: MultiBox rows left out")
        logger.info(notes[-1])
    elif report and not resolve_data_path(model).is_file():
        # Typically not trained yet: the selective search rows are still worth having.
        notes.append(
            f"{resolve_data_path(model)}: MultiBox model file not found (tools/train_multibox.py writes "
            "it): MultiBox rows left out"
        )
        logger.warning(notes[-1])
        spec = replace(spec, multibox=replace(spec.multibox, model=None))
    try:
        return plan_caches(spec, cfg.name, split, cfg.report_baseline if report else None), notes
    except ValueError as err:
        raise UserError(str(err)) from None


def propose(cfg: ProposeConfig, args: argparse.Namespace, world_size: int) -> int:
    setup_logging()
    split_dir = Path(cfg.cache_dir) / cfg.name / args.split
    if args.split not in cfg.splits:
        known = ", ".join(sorted(cfg.splits)) or "none"
        raise UserError(f"--split {args.split}: not in the config's splits ({known})")
    caches, notes = plan(cfg, args.split, args.report)
    dataset = load_split(cfg, args.split)
    workers = cfg.workers or cores_per_rank()
    logger.info("%d process(es) x %d worker(s); caches under %s", world_size, workers, split_dir)
    sets: dict[str, LazyProposals] = {}
    for name, (directory, method) in caches.items():
        summary = build_cache(
            dataset.records,
            method,
            directory,
            workers=workers,
            shard_size=cfg.shard_size,
            progress=not args.no_progress,
            on_bad_image=cfg.on_bad_image,
        )
        bad = BadImages(cfg.on_bad_image, f"{name} {directory}")
        bad.merge(summary["bad_images"])  # skipped images are recorded in the cache, named here
        bad.log_summary(logger)
        logger.info(
            "%s: %s (%d shards computed, %d reused)", name, directory, summary["computed"], summary["reused"]
        )
        if args.report and is_main_process():
            sets[name] = load_cache(dataset.records, method, directory)
    barrier()
    if args.report and is_main_process():
        out = args.out or default_run_dir(args.config, "propose") / f"report_{args.split}"
        rows = report_rows(dataset.records, sets, f"SS {cfg.report_baseline}", cfg.union_dedup_iou)
        title = f"{cfg.name} / {args.split}: {len(dataset.records)} images"
        print(write_report(rows, out, title, {"config": cfglib.config_to_dict(cfg)}, notes))
        print(f"report in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(run_tool(main, get_args_parser().parse_args()))
