"""Compute (or complete) the cached region proposals of a data set split, and report their coverage.

    python tools/propose.py --config configs/det/proposals_fruit.yaml --split test [--set ss.min_size=10]
    python tools/propose.py --config configs/det/proposals_fruit.yaml --split test --report [--out DIR]
    torchrun --nproc_per_node=2 tools/propose.py --config ... --split train

``method`` is ``ss`` (selective search), ``multibox`` or ``both`` (MultiBox's top boxes, then
selective search, near-duplicates removed). Caches live in ``cache_dir/<name>/<split>/<method>``,
fingerprinted by method, parameters and images: a stale cache is rebuilt (with a warning), an
interrupted run continues where it stopped. ``--report`` computes the paper's comparison (SS fast,
SS x2, MultiBox, SS x2 + MultiBox) and writes report.txt, report.json and recall_curves.png to
``--out`` (default ``runs/<config stem>/report_<split>``).
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

from backbone.runtime import config as cfglib
from backbone.runtime.dist import barrier, cleanup_distributed, init_distributed, is_main_process
from backbone.runtime.errors import UserError
from backbone.runtime.log import run_tool, setup_logging
from backbone.runtime.paths import default_run_dir, resolve_data_path
from detect.datasets import DetectionDataset
from detect.datasets.spec import DatasetSpec, open_dataset_spec
from detect.proposals.cache import ProposalCacheError, ProposalSet, build_cache, load_cache
from detect.proposals.methods import (
    MultiBoxMethod,
    ProposalMethod,
    SelectiveSearchMethod,
    UnionMethod,
    cores_per_rank,
)
from detect.proposals.report import coverage_stats, write_report
from detect.proposals.selective_search import filter_ranked_boxes, ss_settings

logger = logging.getLogger("propose")


@dataclass(frozen=True)
class SelectiveSearchConfig:
    preset: str = "fast_x2"  # fast | quality | fast_x2 | quality_x2 (x2: the paper's superpixels x2)
    base_k: int | None = None  # None: the preset's
    inc_k: int | None = None
    sigma: float | None = None
    max_side: int | None = 500
    min_size: float = 20.0
    dedup_iou: float = 1.0
    max_proposals: int | None = None
    seed: int = 0


@dataclass(frozen=True)
class MultiBoxConfig:
    model: str | None = None  # model.pt written by tools/train_multibox.py
    top_k: int = 200


@dataclass(frozen=True)
class ProposeConfig:
    name: str = "dataset"
    splits: dict[str, DatasetSpec] = field(default_factory=dict)
    method: Literal["ss", "multibox", "both"] = "both"
    ss: SelectiveSearchConfig = field(default_factory=SelectiveSearchConfig)
    multibox: MultiBoxConfig = field(default_factory=MultiBoxConfig)
    union_dedup_iou: float = 0.8
    cache_dir: str = "cache/proposals"
    workers: int = 0  # processes per torchrun rank; 0: this rank's share of the cores
    shard_size: int = 16
    report_baseline: str = "fast"  # the plain selective search the report compares against


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", type=Path, required=True, help="YAML config")
    parser.add_argument("--split", required=True, help="a key of the config's 'splits'")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--report", action="store_true", help="compute all four methods and report coverage")
    parser.add_argument("--out", type=Path, default=None, help="report directory")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    return parser


def load_split(cfg: ProposeConfig, split: str) -> DetectionDataset:
    spec = cfg.splits[split]
    dataset, report = open_dataset_spec(spec)
    logger.info("%s/%s: %d images; %s", cfg.name, split, len(dataset.records), report)
    return dataset


def ss_method(cfg: SelectiveSearchConfig, preset: str | None = None) -> SelectiveSearchMethod:
    """The configured selective search, or ``preset`` with the configured filters (report baseline)."""
    fields = {k: v for k, v in asdict(cfg).items() if k != "preset"}
    if preset is not None:
        fields = {k: v for k, v in fields.items() if k not in ("base_k", "inc_k", "sigma")}
    fields = {k: v for k, v in fields.items() if v is not None or k in ("max_side", "max_proposals")}
    try:
        return SelectiveSearchMethod(ss_settings(preset or cfg.preset, **fields))
    except ValueError as err:
        raise UserError(f"ss: {err}") from None


def multibox_method(cfg: MultiBoxConfig) -> MultiBoxMethod:
    if cfg.model is None:
        raise UserError(
            "multibox.model: no MultiBox model file given (train one with tools/train_multibox.py)"
        )
    path = resolve_data_path(cfg.model)
    if not path.is_file():
        raise UserError(f"{path}: MultiBox model file not found")
    return MultiBoxMethod(str(path), cfg.top_k)


def planned_methods(
    cfg: ProposeConfig, split_dir: Path, report: bool
) -> dict[str, tuple[Path, ProposalMethod]]:
    """Display name -> (cache directory, method), components before the unions that read them."""
    plan: dict[str, tuple[Path, ProposalMethod]] = {}
    if report:
        baseline = ss_method(cfg.ss, cfg.report_baseline)
        plan[f"SS {cfg.report_baseline}"] = (split_dir / f"ss_{cfg.report_baseline}", baseline)
    ss = ss_method(cfg.ss)
    ss_name = f"SS {cfg.ss.preset}"
    if report or cfg.method in ("ss", "both"):
        plan[ss_name] = (split_dir / f"ss_{cfg.ss.preset}", ss)
    if report or cfg.method in ("multibox", "both"):
        mb_dir = split_dir / f"multibox_top{cfg.multibox.top_k}"
        mb = multibox_method(cfg.multibox)
        plan["MultiBox"] = (mb_dir, mb)
        if report or cfg.method == "both":
            components = ((str(mb_dir), mb), (str(plan[ss_name][0]), ss))
            union = UnionMethod(components, cfg.union_dedup_iou)
            plan[f"{ss_name} + MultiBox"] = (split_dir / f"{mb_dir.name}+ss_{cfg.ss.preset}", union)
    return plan


def report_rows(records, sets: dict[str, ProposalSet], baseline: str, dedup_iou: float) -> dict[str, dict]:
    rows = {name: coverage_stats(records, s.boxes, s.seconds) for name, s in sets.items()}
    # Fairness check: the union removes near-duplicates, so show the baseline with the same removal.
    base = sets[baseline]
    deduped = [b[filter_ranked_boxes(b, 0.0, dedup_iou, None)] for b in base.boxes]
    rows[f"{baseline} (dedup {dedup_iou:g}, reference)"] = coverage_stats(records, deduped, base.seconds)
    return rows


def main(args: argparse.Namespace) -> int:
    cfg = cfglib.load_config(args.config, ProposeConfig, args.overrides)
    info = init_distributed("cpu")
    try:
        return propose(cfg, args, info.world_size)
    finally:
        cleanup_distributed()


def propose(cfg: ProposeConfig, args: argparse.Namespace, world_size: int) -> int:
    setup_logging()
    split_dir = Path(cfg.cache_dir) / cfg.name / args.split
    if args.split not in cfg.splits:
        known = ", ".join(sorted(cfg.splits)) or "none"
        raise UserError(f"--split {args.split}: not in the config's splits ({known})")
    plan = planned_methods(cfg, split_dir, args.report)  # settings errors before the data set is read
    dataset = load_split(cfg, args.split)
    workers = cfg.workers or cores_per_rank()
    logger.info("%d process(es) x %d worker(s); caches under %s", world_size, workers, split_dir)
    sets: dict[str, ProposalSet] = {}
    try:
        for name, (directory, method) in plan.items():
            summary = build_cache(
                dataset.records,
                method,
                directory,
                workers=workers,
                shard_size=cfg.shard_size,
                progress=not args.no_progress,
            )
            logger.info(
                "%s: %s (%d shards computed, %d reused)",
                name,
                directory,
                summary["computed"],
                summary["reused"],
            )
            if args.report and is_main_process():
                sets[name] = load_cache(dataset.records, method, directory)
    except (ProposalCacheError, FileNotFoundError) as err:
        raise UserError(str(err)) from None
    barrier()
    if args.report and is_main_process():
        out = args.out or default_run_dir(args.config, "propose") / f"report_{args.split}"
        baseline = f"SS {cfg.report_baseline}"
        rows = report_rows(dataset.records, sets, baseline, cfg.union_dedup_iou)
        union = rows[f"SS {cfg.ss.preset} + MultiBox"]
        target = {
            "union_recall@0.5": union["recall@0.5"],
            "baseline_recall@0.5": rows[baseline]["recall@0.5"],
            "proposal_ratio": union["proposals_per_image"] / max(rows[baseline]["proposals_per_image"], 1e-9),
        }
        target["met"] = (
            target["union_recall@0.5"] >= target["baseline_recall@0.5"] and target["proposal_ratio"] <= 0.6
        )
        title = f"{cfg.name} / {args.split}: {len(dataset.records)} images"
        extra = {"config": cfglib.config_to_dict(cfg), "target": target}
        print(write_report(rows, out, title, extra))
        print(
            f"target (SS x2 + MultiBox >= SS {cfg.report_baseline} recall@0.5 with <= 60% of its proposals): "
            f"{'met' if target['met'] else 'NOT met'} (ratio {target['proposal_ratio']:.2f}); report in {out}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(run_tool(main, get_args_parser().parse_args()))
