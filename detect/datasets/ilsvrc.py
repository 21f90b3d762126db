"""ILSVRC DET (2013-2017 layout): ``Data/DET/<split>``, ``Annotations/DET/<split>``, ``ImageSets/DET``.

Objects are named by WordNet synset id (``n02672831``); a mapping gives each of the 200 classes its
index and name: the devkit's ``meta_det.mat`` or a text file with lines ``WNID [INDEX] NAME...``
(e.g. ``map_det.txt``). Images listed without an annotation file are the negative-only images
(``ILSVRC2013_train_extra*``): they are kept with no objects and counted in the report.

List files hold ``NAME [NUMBER]``. In ``val.txt`` / ``test.txt`` NUMBER is the official image index
the devkit scores submissions by, so it becomes ``image_id`` when the numbers are distinct positive
integers; in the per-class ``train_K.txt`` lists NUMBER is a +1/-1 flag, and ids are 1-based
positions instead.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from backbone.bad_images import OnBadImage
from detect.datasets.common import (
    DatasetError,
    LoadReport,
    OnError,
    default_workers,
    first_listed,
    map_items,
    read_image_info,
    resolve_inside,
)
from detect.datasets.records import DetectionDataset, DetectionRecord
from detect.datasets.voc import parse_voc_xml, record_from_xml

SYNSETS_HINT = "not in the synset mapping; give one that lists them (--synsets meta_det.mat or map_det.txt)"


def _det_id_field(names: tuple[str, ...]) -> str:
    for candidate in names:
        if candidate.upper().endswith("DET_ID"):
            return candidate
    raise KeyError("DET_ID")


def read_synset_mapping(path: str | Path) -> list[tuple[str, str]]:
    """``[(wnid, name)]`` in class-index order from ``meta_det.mat`` or a ``WNID [INDEX] NAME`` text."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(path, "synset mapping file not found")
    if path.suffix.lower() == ".mat":
        from scipy.io import loadmat  # only this branch needs scipy.io

        try:
            synsets = loadmat(str(path), squeeze_me=True, struct_as_record=True)["synsets"]
            id_field = _det_id_field(synsets.dtype.names)
            rows = [(int(s[id_field]), str(s["WNID"]), str(s["name"])) for s in np.atleast_1d(synsets)]
        except (KeyError, ValueError, TypeError, OSError) as err:
            raise DatasetError(
                path, f"not an ILSVRC meta_det.mat with synsets (DET_ID, WNID, name): {err}"
            ) from None
        # Ids 1..200 are the detection classes; larger ids are hierarchy nodes used for display only.
        rows = sorted(r for r in rows if 1 <= r[0] <= 200)
        return [(wnid, name) for _, wnid, name in rows]
    mapping: list[tuple[int, str, str]] = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) >= 3 and parts[1].isdigit():
            mapping.append((int(parts[1]), parts[0], " ".join(parts[2:])))
        elif len(parts) >= 2:
            mapping.append((len(mapping) + 1, parts[0], " ".join(parts[1:])))
        else:
            raise DatasetError(path, f"line {number}: expected 'WNID [INDEX] NAME', got {line.strip()!r}")
    mapping.sort()
    wnids = [w for _, w, _ in mapping]
    if len(set(wnids)) != len(wnids):
        raise DatasetError(path, "a synset id appears twice")
    return [(wnid, name) for _, wnid, name in mapping]


def read_image_set(path: Path) -> list[tuple[str, int | None]]:
    """``[(name, number)]`` from an ``ImageSets/DET`` list file."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise DatasetError(path, "image set list not found") from None
    entries: list[tuple[str, int | None]] = []
    for number, line in enumerate(lines, start=1):
        parts = line.split()
        if not parts:
            continue
        try:
            entries.append((parts[0], int(parts[1]) if len(parts) > 1 else None))
        except ValueError:
            raise DatasetError(path, f"line {number}: second column {parts[1]!r} is not an integer") from None
    return entries


def _numbers_are_image_ids(entries: list[tuple[str, int | None]], list_file: Path) -> bool:
    """Whether the second column holds image indices (distinct positive) rather than +1/-1 flags.

    All positive with one above 1 can only be an index list, so a repeated index there is an error:
    falling back to positions would silently score detections against the wrong images.
    """
    numbers = [n for _, n in entries]
    if not all(n is not None and n > 0 for n in numbers):
        return False
    first_name: dict[int | None, str] = {}
    for name, number in entries:
        if number in first_name and any(n != 1 for n in numbers):
            raise DatasetError(
                list_file, f"image index {number} is listed twice ({first_name[number]} and {name})"
            )
        first_name.setdefault(number, name)
    return len(first_name) == len(numbers)


def read_ilsvrc_det(
    root: str | Path,
    split: str = "val",
    image_set: str | None = None,
    synsets: str | Path | list[tuple[str, str]] | None = None,
    on_error: OnError = "raise",
    workers: int | None = None,
    require_images: bool = True,
    on_bad_image: OnBadImage = "skip",
) -> tuple[DetectionDataset, LoadReport]:
    """Read ``root/ImageSets/DET/<image_set or split>.txt`` over ``Data/DET/<split>``.

    ``require_images=False``: ``Data/DET`` may be absent; sizes then come from the XML files (a
    negative-only image, with no XML, loads as 0x0: it has no boxes whose size would matter).

    ``synsets``: mapping file, ``[(wnid, name)]``, or None to look for ``devkit/data/meta_det.mat``
    or ``map_det.txt`` / ``devkit/data/map_det.txt`` under ``root``.
    """
    root = Path(root)
    if synsets is None:
        candidates = [
            root / "devkit/data/meta_det.mat",
            root / "map_det.txt",
            root / "devkit/data/map_det.txt",
        ]
        found = next((c for c in candidates if c.is_file()), None)
        if found is None:
            raise DatasetError(root, "no synset mapping found (pass synsets=meta_det.mat or map_det.txt)")
        synsets = found
    mapping = read_synset_mapping(synsets) if isinstance(synsets, (str, Path)) else list(synsets)
    class_index = {wnid: i for i, (wnid, _) in enumerate(mapping)}
    list_file = root / "ImageSets" / "DET" / f"{image_set or split}.txt"
    report = LoadReport(name=f"ILSVRC DET {image_set or split}")
    entries = read_image_set(list_file)
    entries = [entries[i] for i in first_listed([name for name, _ in entries], list_file, report)]
    use_numbers = _numbers_are_image_ids(entries, list_file)
    data_dir, ann_dir = root / "Data" / "DET" / split, root / "Annotations" / "DET" / split
    items = [
        (
            int(number) if use_numbers else i + 1,  # type: ignore[arg-type]
            resolve_inside(data_dir, f"{name}.JPEG", list_file),
            resolve_inside(ann_dir, f"{name}.xml", list_file),
        )
        for i, (name, number) in enumerate(entries)
    ]

    def build(item: tuple[int, Path, Path]) -> tuple[DetectionRecord, list[tuple[str, str]]]:
        image_id, image_path, xml_path = item
        if not xml_path.is_file():  # a negative-only image: nothing of the 200 classes in it
            if require_images or image_path.is_file():
                info = read_image_info(image_path)
                width, height, events = info.width, info.height, list(info.events)
            else:  # nothing annotated, nothing to clip: the size does not matter
                width, height, events = 0, 0, [("size_unknown_no_objects", str(image_path))]
            record = DetectionRecord(image_id, str(image_path), width, height)
            return record, [*events, ("negative_image_no_annotation", str(image_path))]
        annotation = parse_voc_xml(xml_path)
        return record_from_xml(annotation, image_path, image_id, class_index, require_images, SYNSETS_HINT)

    records = []
    for _, built, error in map_items(build, items, workers or default_workers(), on_error, on_bad_image):
        if error is not None:
            report.add("skipped", f"{error.path}: {error.problem}")
        else:
            records.append(built[0])
            report.extend(built[1])
    class_names = [name for _, name in mapping]
    return DetectionDataset(records, class_names, list(range(1, len(mapping) + 1)), report.name), report
