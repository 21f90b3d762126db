"""The proposal section of a config, shared by tools/propose.py, train_det and test_det, and the plan of
cache directories it implies, so a consumer finds exactly the caches propose.py writes.

Caches live in ``cache_dir/<name>/<split>/<method dir>``: ``ss_<preset>``, ``multibox_top<k>`` and
their union ``multibox_top<k>+ss_<preset>`` (MultiBox's boxes first, near-duplicates removed).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from backbone.bad_images import BadImages
from backbone.runtime.config import config_from_dict
from backbone.runtime.dist import any_rank
from backbone.runtime.paths import resolve_data_path
from detect.datasets.records import DetectionRecord
from detect.proposals.cache import (
    MANIFEST,
    ProposalCacheError,
    bad_image_events,
    build_cache,
    cache_fingerprint,
    load_cache,
)
from detect.proposals.methods import (
    MultiBoxMethod,
    ProposalMethod,
    SelectiveSearchMethod,
    UnionMethod,
    cores_per_rank,
    method_summary,
)
from detect.proposals.selective_search import ss_settings
from detect.proposals.shards import LazyProposals


@dataclass(frozen=True)
class SelectiveSearchSpec:
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
class MultiBoxSpec:
    model: str | None = None  # model.pt written by tools/train_multibox.py
    top_k: int = 200
    min_size: float = 20.0  # the top_k boxes at least this wide and high once clipped (as ss.min_size)


@dataclass(frozen=True)
class ProposalSpec:
    method: Literal["ss", "multibox", "both"] = "ss"  # both: the paper's (needs a MultiBox model)
    ss: SelectiveSearchSpec = field(default_factory=SelectiveSearchSpec)
    multibox: MultiBoxSpec = field(default_factory=MultiBoxSpec)
    union_dedup_iou: float = 0.7  # chosen on fruit test (README, "Region proposals")
    cache_dir: str = "runs/cache/proposals"
    workers: int = 0  # processes per torchrun rank; 0: this rank's share of the cores
    shard_size: int = 16


def ss_method(spec: SelectiveSearchSpec, preset: str | None = None) -> SelectiveSearchMethod:
    """The configured selective search, or ``preset`` with the configured filters (report baseline)."""
    fields = {k: v for k, v in asdict(spec).items() if k != "preset"}
    if preset is not None:
        fields = {k: v for k, v in fields.items() if k not in ("base_k", "inc_k", "sigma")}
    fields = {k: v for k, v in fields.items() if v is not None or k in ("max_side", "max_proposals")}
    try:
        return SelectiveSearchMethod(ss_settings(preset or spec.preset, **fields))
    except ValueError as err:
        raise ValueError(f"ss: {err}") from None  # the config key the error is about


def multibox_method(spec: MultiBoxSpec) -> MultiBoxMethod:
    if spec.model is None:
        raise ValueError(
            "multibox.model: no MultiBox model file given (train one with tools/train_multibox.py)"
        )
    path = resolve_data_path(spec.model)
    if not path.is_file():
        raise ValueError(f"{path}: MultiBox model file not found")
    return MultiBoxMethod(str(path), spec.top_k, spec.min_size)


def plan_caches(
    spec: ProposalSpec, name: str, split: str, report_baseline: str | None = None
) -> dict[str, tuple[Path, ProposalMethod]]:
    """Display name -> (cache directory, method), components before the unions that read them;
    the last entry is the configured method. ValueError for settings that make no method (an
    unknown preset, a MultiBox method without its model file).

    ``report_baseline`` plans the coverage report instead: that plain preset first, then every
    method (the configured one among them); the MultiBox rows only when ``multibox.model`` names a
    model, so that without one the report is selective search alone."""
    split_dir = Path(spec.cache_dir) / name / split
    plan: dict[str, tuple[Path, ProposalMethod]] = {}
    report = report_baseline is not None
    if report:
        plan[f"SS {report_baseline}"] = (
            split_dir / f"ss_{report_baseline}",
            ss_method(spec.ss, report_baseline),
        )
    ss = ss_method(spec.ss)
    ss_name = f"SS {spec.ss.preset}"
    if report or spec.method in ("ss", "both"):
        plan[ss_name] = (split_dir / f"ss_{spec.ss.preset}", ss)
    with_multibox = spec.multibox.model is not None if report else spec.method in ("multibox", "both")
    if with_multibox:
        mb_dir = split_dir / f"multibox_top{spec.multibox.top_k}"
        mb = multibox_method(spec.multibox)
        plan["MultiBox"] = (mb_dir, mb)
        if report or spec.method == "both":
            union = UnionMethod(((str(mb_dir), mb), (str(plan[ss_name][0]), ss)), spec.union_dedup_iou)
            plan[f"{ss_name} + MultiBox"] = (split_dir / f"{mb_dir.name}+ss_{spec.ss.preset}", union)
    if not report and spec.method == "multibox":
        plan = {"MultiBox": plan["MultiBox"]}
    return plan


def configured_method(spec: ProposalSpec, name: str, split: str) -> tuple[Path, ProposalMethod]:
    return list(plan_caches(spec, name, split).values())[-1]


def proposal_settings(spec: ProposalSpec) -> dict[str, Any]:
    """The spec as a plain dict (stored in a detector's model file to propose on new images);
    :func:`spec_from_settings` rebuilds it."""
    return asdict(spec)


def spec_from_settings(settings: dict[str, Any], source: str = "proposal settings") -> ProposalSpec:
    """The :class:`ProposalSpec` that :func:`proposal_settings` described (validated like a config:
    an unknown key or a wrong type is a UserError naming ``source``)."""
    return config_from_dict(ProposalSpec, settings, source=source)


def method_description(spec: ProposalSpec, directory: Path, method: ProposalMethod) -> dict[str, Any]:
    """What a model file records about its proposals: the cache directory, the method's kind and
    summary (MultiBox model path and top_k, union dedup IoU) and the spec's settings."""
    described: dict[str, Any] = {"directory": str(directory), **method_summary(method)}
    if isinstance(method, UnionMethod):
        multibox = [m for _, m in method.components if isinstance(m, MultiBoxMethod)]
        if multibox:
            described["multibox"] = {
                "model": multibox[0].checkpoint,
                "top_k": multibox[0].top_k,
                "min_size": multibox[0].min_size,
            }
    return {**described, "settings": proposal_settings(spec)}


def ensure_proposals(
    records: list[DetectionRecord],
    spec: ProposalSpec,
    name: str,
    split: str,
    *,
    progress: bool = True,
    on_bad_image: str = "skip",
) -> tuple[LazyProposals, dict[str, Any]]:
    """The configured method's proposals for ``records``: read from its cache, or built (every
    planned cache, as propose.py would) when there is none or a killed run left it incomplete (its
    shards are kept). A cache of other images or settings is refused with one line saying which
    directory to delete so that the next run rebuilds it (never replaced behind the user's back:
    other runs may read it).
    Images the cache records as skipped or partial are summarised in the log, or, under
    ``on_bad_image="error"``, stop the run with one line (``backbone.bad_images``)."""
    try:
        plan = plan_caches(spec, name, split)
    except ValueError as err:
        raise ProposalCacheError(f"proposals: {err}") from None
    directory, method = list(plan.values())[-1]
    # Decided together: a rank that looked after another had started writing the manifest would
    # skip the (collective) build and read a cache still in progress.
    if any_rank(_unbuilt(directory, records, method)):
        for component_dir, component in plan.values():
            build_cache(
                records,
                component,
                component_dir,
                workers=spec.workers or cores_per_rank(),
                shard_size=spec.shard_size,
                progress=progress,
                on_bad_image=on_bad_image,
            )
    try:
        proposals = load_cache(records, method, directory)
    except ProposalCacheError as err:
        problem = str(err).split("; ")[0]
        raise ProposalCacheError(f"{problem}; delete {directory} and run again to rebuild it") from None
    bad = BadImages(on_bad_image, f"proposals {name}/{split}")
    bad.merge(bad_image_events(records, proposals))  # BadImageError under "error"
    bad.log_summary()
    return proposals, method_description(spec, directory, method)


def _unbuilt(directory: Path, records: list[DetectionRecord], method: ProposalMethod) -> bool:
    """No cache, or an incomplete one of exactly this method and these images (an interrupted build,
    which build_cache completes); a stale or unreadable one is for load_cache to refuse."""
    try:
        manifest = json.loads((directory / MANIFEST).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return True
    except (OSError, ValueError):
        return False
    if not isinstance(manifest, dict) or manifest.get("complete"):
        return False
    return manifest.get("fingerprint") == cache_fingerprint(records, method, manifest)[0]
