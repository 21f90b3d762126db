"""Proposals of a whole split, cached as fingerprinted ``.npz`` shards; resumable and parallel.

Layout of a cache directory::

    manifest.json        fingerprint and what went into it, shard size, completeness
    shard_00000.npz      image_ids, counts, boxes (sum(counts), 4), scores, seconds, fingerprint,
                         status / status_detail per image ("" , "partial" or "skipped" and why)

The fingerprint hashes the method and all its parameters (the MultiBox file's content, OpenCV's
version) and the data set (each image's id and the hash of its bytes). A cache whose fingerprint
differs from the wanted one is stale: it is reported, deleted and rebuilt, never read. Hashing every
image on every run would cost a read of the whole data set, so the manifest also keeps a stat
signature (each image's path, byte size and modification time), as git's index does: while it
matches, the manifest's content hash is trusted without reading a file; when it does not (the data
set copied anew or moved), the images are hashed once, and a cache of the same bytes is kept and its
signature refreshed.
Shards are written atomically (temporary file + rename), so an interrupted run leaves only
complete shards, and the next run computes just the missing ones (a kill -9 leaves a shard's
temporary file, which the next build removes). Every shard carries the
fingerprint too, so a shard left over from another configuration is never mistaken for a valid one.
Reading (``load_cache``, ``read_cache``) checks every shard's fingerprint and images but leaves the
proposals on disk: ``detect.proposals.shards.LazyProposals`` reads one image's when asked.

Bad images follow ``backbone.bad_images`` (``on_bad_image``): under ``skip`` an image that cannot
be decoded gets no proposals and is recorded in its shard as skipped (a truncated JPEG decoded as far
as it goes, as partial), so a resumed or later run neither redoes it nor loses the fact;
``bad_image_events`` lists what a cache recorded, and a reader under ``error`` stops on it.

Images are processed by a pool of worker processes (one per core of this torchrun process); under
torchrun, shard ``i`` belongs to rank ``i % world_size`` and every rank writes its own shards.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from tqdm import tqdm

from backbone.bad_images import DEFAULT_ON_BAD_IMAGE, BadImages, Event
from backbone.runtime.dist import barrier, get_rank, get_world_size
from backbone.runtime.files import atomic_write_text, remove_leftover_temporaries
from detect.datasets.records import DetectionRecord
from detect.proposals.methods import (
    ProposalMethod,
    UnionMethod,
    init_worker,
    method_summary,
    propose_image,
    union_proposals,
)
from detect.proposals.shards import (
    LazyProposals,
    ProposalCacheError,
    ShardIndex,
    read_shard,
    shard_path,
    shard_status,
    write_shard,
)

log = logging.getLogger(__name__)

CACHE_FORMAT_VERSION = 2  # 2: the data set part hashes image bytes, not paths and dates
MANIFEST = "manifest.json"
RERUN = "build it with tools/propose.py"


def stat_signature(records: Sequence[DetectionRecord]) -> str:
    """Hash of every image's id, path, byte size and mtime: cheap, and unchanged while no file is touched."""
    digest = hashlib.sha256()
    for record in records:
        stat = os.stat(record.file_name)
        digest.update(f"{record.image_id}\t{record.file_name}\t{stat.st_size}\t{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def _file_digest(path: str) -> str:
    try:
        with open(path, "rb") as handle:
            return hashlib.file_digest(handle, "sha256").hexdigest()
    except OSError as error:  # a directory or unreadable file: a bad image, which the cache records as such
        return f"unreadable {type(error).__name__} {os.stat(path).st_size}"


def content_fingerprint(records: Sequence[DetectionRecord]) -> str:
    """Hash of every image's id and bytes (each distinct file read once): what the proposals depend on,
    whatever the files' paths or dates."""
    digest, file_digests = hashlib.sha256(), {}
    for record in records:
        if record.file_name not in file_digests:
            file_digests[record.file_name] = _file_digest(record.file_name)
        digest.update(f"{record.image_id}\t{file_digests[record.file_name]}\n".encode())
    return digest.hexdigest()


def dataset_fingerprint(
    records: Sequence[DetectionRecord], manifest: dict[str, Any] | None = None
) -> tuple[str, str]:
    """``(content fingerprint, stat signature)`` of the images; the content fingerprint comes from
    ``manifest`` without reading any image when its stat signature still matches."""
    signature = stat_signature(records)
    if isinstance(manifest, dict) and manifest.get("stat_signature") == signature:
        parts = manifest.get("parts")
        if isinstance(parts, dict) and parts.get("dataset") is not None:
            return parts["dataset"], signature
    return content_fingerprint(records), signature


def cache_fingerprint(
    records: Sequence[DetectionRecord], method: ProposalMethod, manifest: dict[str, Any] | None = None
) -> tuple[str, dict]:
    """The fingerprint a cache of ``method`` over ``records`` carries, and its parts. ``manifest``: an
    existing cache's, whose content hash spares reading the images while none changed (see above)."""
    return _fingerprint(method, dataset_fingerprint(records, manifest)[0], len(records))


def _fingerprint(method: ProposalMethod, content: str, num_images: int) -> tuple[str, dict]:
    parts = {
        "format_version": CACHE_FORMAT_VERSION,
        "method": method.fingerprint(),
        "dataset": content,
        "num_images": num_images,
    }
    text = json.dumps(parts, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest(), parts


def bad_image_events(records: Sequence[DetectionRecord], proposals: LazyProposals) -> list[Event]:
    """``(kind, file name, detail)`` of every image a cache recorded as skipped or partial."""
    return [(kind, records[i].file_name, detail) for i, (kind, detail) in enumerate(proposals.status) if kind]


# ---- building ---------------------------------------------------------------------------------


def _read_manifest(cache_dir: Path) -> dict[str, Any] | None:
    try:
        return json.loads((cache_dir / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


LEFTOVER_AGE_S = 600.0  # a shard write takes well under a second


def _write_manifest(cache_dir: Path, manifest: dict[str, Any]) -> None:
    atomic_write_text(cache_dir / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True))


def _changed_parts(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    return sorted(key for key in set(old) | set(new) if old.get(key) != new.get(key)) or ["unknown"]


def _prepare_directory(cache_dir: Path, fingerprint: str, parts: dict, manifest: dict) -> None:
    """Rank 0: delete killed writes' temporaries and a stale cache (saying why), then record the
    wanted fingerprint."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    # Another job may be building this same cache (same settings and images): spare its writes.
    remove_leftover_temporaries(cache_dir, min_age_s=LEFTOVER_AGE_S)
    old = _read_manifest(cache_dir)
    if old is not None and old.get("fingerprint") != fingerprint:
        changed = _changed_parts(old.get("parts", {}), parts)
        log.warning("%s: stale proposal cache (changed: %s), rebuilding", cache_dir, ", ".join(changed))
    if old is None or old.get("fingerprint") != fingerprint:
        for stale in cache_dir.glob("shard_*.npz"):
            stale.unlink()
        _write_manifest(cache_dir, manifest)


def _shard_ranges(num_images: int, shard_size: int) -> list[range]:
    return [range(start, min(start + shard_size, num_images)) for start in range(0, num_images, shard_size)]


def build_cache(
    records: Sequence[DetectionRecord],
    method: ProposalMethod,
    cache_dir: str | Path,
    *,
    workers: int = 1,
    shard_size: int = 16,
    progress: bool = True,
    on_bad_image: str = DEFAULT_ON_BAD_IMAGE,
) -> dict[str, Any]:
    """Compute (or complete) the cache of ``method`` over ``records`` in ``cache_dir``.

    Returns a summary: ``computed`` / ``reused`` shard counts of this rank and ``bad_images``, the
    events (``bad_image_events``) the whole cache records. A bad image follows ``on_bad_image``:
    recorded as skipped (each one logged when met), or BadImageError at once. Collective under
    torchrun: every rank must call it with the same arguments.
    """
    cache_dir = Path(cache_dir)
    bad = BadImages(on_bad_image, f"proposals {cache_dir.name}")
    content, signature = dataset_fingerprint(records, _read_manifest(cache_dir))
    fingerprint, parts = _fingerprint(method, content, len(records))
    ranges = _shard_ranges(len(records), shard_size)
    manifest = {
        "fingerprint": fingerprint,
        "parts": parts,
        "stat_signature": signature,
        "method": method_summary(method),
        "shard_size": shard_size,
        "num_shards": len(ranges),
        "complete": False,
    }
    rank, world = get_rank(), get_world_size()
    if rank == 0:
        _prepare_directory(cache_dir, fingerprint, parts, manifest)
    barrier()
    ids = np.array([r.image_id for r in records], dtype=np.int64)
    mine = [s for s in range(len(ranges)) if s % world == rank]
    todo = [s for s in mine if read_shard(shard_path(cache_dir, s), fingerprint, ids[ranges[s]]) is None]
    if len(todo) < len(mine):
        done = len(mine) - len(todo)
        log.info("%s: %d of %d shards already done, computing %d", cache_dir, done, len(mine), len(todo))
    if isinstance(method, UnionMethod):
        _build_union_shards(records, method, cache_dir, fingerprint, ranges, todo)
    else:
        _build_shards(records, method, cache_dir, fingerprint, ranges, todo, workers, progress, bad)
    barrier()
    # Every rank checks (and fails) alike, so no rank is left waiting at a barrier.
    missing, events = [], []
    for s, r in enumerate(ranges):
        index = read_shard(shard_path(cache_dir, s), fingerprint, ids[r])
        if index is None:
            missing.append(s)
            continue
        status = shard_status(index.arrays)
        events += [(kind, records[i].file_name, d) for i, (kind, d) in zip(r, status, strict=True) if kind]
    if missing:
        raise ProposalCacheError(f"{cache_dir}: shards {missing[:5]} missing after the build")
    if rank == 0:
        _write_manifest(cache_dir, {**manifest, "complete": True})
    barrier()
    summary = {"computed": len(todo), "reused": len(mine) - len(todo), "fingerprint": fingerprint}
    return summary | {"bad_images": events}


def _pool_results(
    method: ProposalMethod, tasks: list[tuple[int, str, bool]], workers: int
) -> Iterator[tuple]:
    """Results of ``propose_image`` over ``tasks``, in completion order; in-process for 1 worker."""
    if workers <= 1:
        # In-process: one thread as a pool worker has, then the caller's thread counts back (a
        # training tool that builds its caches first must not go on training with one thread).
        torch_threads, cv2_threads = torch.get_num_threads(), cv2.getNumThreads()
        try:
            init_worker(method, threads=1)
            yield from map(propose_image, tasks)
        finally:
            torch.set_num_threads(torch_threads)
            cv2.setNumThreads(cv2_threads)
        return
    # fork: workers start in milliseconds and inherit the imported modules (spawn re-imports
    # torch and OpenCV in every worker); the parent has run no torch parallel region yet.
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    with context.Pool(workers, initializer=init_worker, initargs=(method, 1)) as pool:
        yield from pool.imap_unordered(propose_image, tasks, chunksize=1)


def _build_shards(
    records: Sequence[DetectionRecord],
    method: ProposalMethod,
    cache_dir: Path,
    fingerprint: str,
    ranges: list[range],
    todo: list[int],
    workers: int,
    progress: bool,
    bad: BadImages,
) -> None:
    shard_of = {i: s for s in todo for i in ranges[s]}
    tasks = [(i, records[i].file_name, bad.partial_allowed) for s in todo for i in ranges[s]]
    pending: dict[int, dict[int, tuple]] = {s: {} for s in todo}
    done_images = sum(len(r) for r in ranges) - len(tasks)
    bar = tqdm(
        total=sum(len(r) for r in ranges),
        initial=done_images,
        desc=f"proposals {cache_dir.name}",
        unit="img",
        disable=not progress or get_rank() != 0,
        dynamic_ncols=True,
        mininterval=1.0,
    )
    with bar:
        for index, boxes, scores, seconds, status in _pool_results(method, tasks, workers):
            kind, detail = status
            if kind == "skipped":
                bad.skip(records[index].file_name, detail)  # BadImageError under "error"
            elif kind:
                bad.add(kind, records[index].file_name, detail)
            shard = shard_of[index]
            pending[shard][index] = (boxes, scores, seconds, status)
            bar.update(1)
            if len(pending[shard]) == len(ranges[shard]):
                done = [pending[shard][i] for i in ranges[shard]]
                ids = np.array([records[i].image_id for i in ranges[shard]], dtype=np.int64)
                results = [(b, s, t) for b, s, t, _ in done]
                write_shard(shard_path(cache_dir, shard), fingerprint, ids, results, [d[3] for d in done])
                del pending[shard]


def _build_union_shards(
    records: Sequence[DetectionRecord],
    method: UnionMethod,
    cache_dir: Path,
    fingerprint: str,
    ranges: list[range],
    todo: list[int],
) -> None:
    """The union is cheap (one NMS per image): computed in-process from the component caches."""
    components = [load_cache(records, component, directory) for directory, component in method.components]
    for shard in todo:
        results, status = [], []
        for i in ranges[shard]:
            parts = [c[i] for c in components]
            boxes, scores = union_proposals(parts, method.dedup_iou)
            results.append((boxes, scores, float(sum(c.seconds[i] for c in components))))
            # The components decoded the same file: the union keeps the worst of their statuses.
            recorded = [c.status[i] for c in components if c.status and c.status[i][0]]
            status.append(min(recorded, key=lambda s: s[0] != "skipped") if recorded else ("", ""))
        ids = np.array([records[i].image_id for i in ranges[shard]], dtype=np.int64)
        write_shard(shard_path(cache_dir, shard), fingerprint, ids, results, status)


# ---- reading ----------------------------------------------------------------------------------


def read_cache(
    records: Sequence[DetectionRecord], cache_dir: str | Path
) -> tuple[LazyProposals, dict[str, Any]]:
    """Read whatever method a complete cache holds (for consumers such as train_det that point at a
    cache built by tools/propose.py), checking that it was built from exactly these images.

    Returns the proposals and the manifest (``manifest["method"]`` says what they are).
    """
    cache_dir = Path(cache_dir)
    manifest = _read_manifest(cache_dir)
    if manifest is None:
        raise ProposalCacheError(f"{cache_dir}: no proposal cache here; {RERUN}")
    parts = manifest.get("parts", {})
    content, signature = dataset_fingerprint(records, manifest)
    if parts.get("dataset") != content or parts.get("num_images") != len(records):
        raise ProposalCacheError(f"{cache_dir}: stale proposal cache (changed: dataset); {RERUN}")
    proposals = _read_shards(records, cache_dir, manifest)
    _refresh_signature(cache_dir, manifest, signature)
    return proposals, manifest


def load_cache(
    records: Sequence[DetectionRecord], method: ProposalMethod, cache_dir: str | Path
) -> LazyProposals:
    """Read a complete cache of ``method`` over ``records``; ProposalCacheError if it is missing,
    incomplete or stale (it is never returned silently out of date)."""
    cache_dir = Path(cache_dir)
    manifest = _read_manifest(cache_dir)
    if manifest is None:
        raise ProposalCacheError(f"{cache_dir}: no proposal cache here; {RERUN}")
    content, signature = dataset_fingerprint(records, manifest)
    fingerprint, parts = _fingerprint(method, content, len(records))
    if manifest.get("fingerprint") != fingerprint:
        changed = ", ".join(_changed_parts(manifest.get("parts", {}), parts))
        raise ProposalCacheError(f"{cache_dir}: stale proposal cache (changed: {changed}); {RERUN}")
    proposals = _read_shards(records, cache_dir, manifest)
    _refresh_signature(cache_dir, manifest, signature)
    return proposals


def _refresh_signature(cache_dir: Path, manifest: dict[str, Any], signature: str) -> None:
    """A valid cache whose images were copied or moved since: record their new paths and dates, so
    that the next reader trusts the content hash without reading every image again."""
    if manifest.get("stat_signature") == signature:
        return
    log.info("%s: the images were copied or moved since the build, same bytes: cache kept", cache_dir)
    if get_rank() == 0:
        try:
            _write_manifest(cache_dir, {**manifest, "stat_signature": signature})
        except OSError as error:  # a read-only cache stays usable: its readers hash the images each time
            log.warning(
                "%s: cannot record the images' new dates (%s); the next read hashes again", cache_dir, error
            )


def _read_shards(
    records: Sequence[DetectionRecord], cache_dir: Path, manifest: dict[str, Any]
) -> LazyProposals:
    """Every shard validated (its per-image arrays read), none of their proposals."""
    if not manifest.get("complete"):
        raise ProposalCacheError(f"{cache_dir}: proposal cache incomplete (interrupted?); {RERUN}")
    ids = np.array([r.image_id for r in records], dtype=np.int64)
    shards: list[ShardIndex] = []
    for shard, indices in enumerate(_shard_ranges(len(records), manifest["shard_size"])):
        index = read_shard(shard_path(cache_dir, shard), manifest["fingerprint"], ids[indices])
        if index is None:
            raise ProposalCacheError(f"{shard_path(cache_dir, shard)}: missing or foreign shard; {RERUN}")
        shards.append(index)
    return LazyProposals(ids, shards)
