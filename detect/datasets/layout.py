"""Where a folder data set keeps its images and its VOC XML files: given, or found from the content.

Users name the XML folder anything (``annotations/``, ``annots/``, ``xml/``, ``labels/``), so it is
found by what it holds, never by its name: a folder of ``*.xml`` files whose stems match the stems
of the images. Looked at, in this order: XML beside the images of the folder named (``fruit/``);
then every pairing of an image folder (the folder named or its subfolders) with an XML folder (the
folder named, its subfolders, and the image folder's subfolders and siblings). One match is used;
several are one error asking for the explicit ``image_root`` / ``annotations``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from detect.datasets.common import IMAGE_SUFFIXES, DatasetError

ASK_IMAGES = "set image_root (--image-root) to the folder of the images"
ASK_ANNOTATIONS = "set annotations (--annotations) to the folder of the XML files"


@dataclass(frozen=True)
class FolderLayout:
    images: Path
    annotations: Path


class _Contents:
    """Stems of the image and XML files directly in each folder, each folder listed once."""

    def __init__(self) -> None:
        self.seen: dict[Path, tuple[frozenset[str], frozenset[str]]] = {}

    def _list(self, folder: Path) -> tuple[frozenset[str], frozenset[str]]:
        if folder not in self.seen:
            images, xml = set(), set()
            try:
                with os.scandir(folder) as entries:
                    for entry in entries:
                        stem, suffix = os.path.splitext(entry.name)
                        suffix = suffix.lower()
                        if (suffix == ".xml" or suffix in IMAGE_SUFFIXES) and entry.is_file():
                            (xml if suffix == ".xml" else images).add(stem)
            except OSError:  # absent or unreadable: holds nothing
                pass
            self.seen[folder] = (frozenset(images), frozenset(xml))
        return self.seen[folder]

    def images(self, folder: Path) -> frozenset[str]:
        return self._list(folder)[0]

    def xml(self, folder: Path) -> frozenset[str]:
        return self._list(folder)[1]


def subfolders(folder: Path) -> list[Path]:
    """Visible subdirectories, sorted (hidden ones such as ``.cache`` are never data)."""
    try:
        return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    except OSError:
        return []


def looks_like_folder_dataset(path: Path) -> bool:
    """Images or XML files in ``path``, or XML files in one of its subfolders."""
    contents = _Contents()
    if contents.images(path) or contents.xml(path):
        return True
    return any(contents.xml(sub) for sub in subfolders(path))


def resolve_folder_layout(
    path: str | Path,
    image_root: str | Path | None = None,
    annotations: str | Path | None = None,
    require_images: bool = True,
) -> FolderLayout:
    """The image and XML folders of the folder data set ``path``; given ones are used as they are.

    Paths come back absolute (siblings of ``.`` need its real parent); records hold absolute
    file names anyway.
    """
    path = _absolute(path)
    image_root = _absolute(image_root) if image_root is not None else None
    annotations = _absolute(annotations) if annotations is not None else None
    if image_root is not None and annotations is not None:
        return FolderLayout(image_root, annotations)
    contents = _Contents()
    named = image_root if image_root is not None else path
    # XML beside the images of the folder named (fruit/): nothing else needs to be listed.
    if annotations is None and contents.images(named) & contents.xml(named):
        return FolderLayout(named, named)
    if image_root is not None:
        image_dirs = [named]
    else:
        image_dirs = [d for d in [path, *subfolders(path)] if contents.images(d)]
    if annotations is not None:
        xml_dirs = [annotations]
    else:
        xml_dirs = [d for d in _xml_candidates(path, named, contents) if contents.xml(d)]
    pairs = [(i, x) for i in image_dirs for x in xml_dirs if contents.images(i) & contents.xml(x)]
    if len(pairs) > 1 and any(i == named for i, _ in pairs):  # the folder named holds the images
        pairs = [(i, x) for i, x in pairs if i == named]
    if len(pairs) == 1:
        return FolderLayout(*pairs[0])
    if len(pairs) > 1:
        shown = "; ".join(f"images {_short(i, path)} with XML {_short(x, path)}" for i, x in pairs)
        raise DatasetError(
            path, f"several image and annotation folders match ({shown}): {ASK_ANNOTATIONS} and {ASK_IMAGES}"
        )
    # No stems in common: the XML may name its image in <filename>, or the images may be absent.
    xml_dir = _only_annotation_folder(path, annotations, xml_dirs)
    return FolderLayout(_only_image_folder(path, xml_dir, image_root, image_dirs, require_images), xml_dir)


def _xml_candidates(path: Path, named: Path, contents: _Contents) -> list[Path]:
    """The folder named and its subfolders; for a folder of images also their siblings."""
    candidates = [path, *subfolders(path)]
    if contents.images(named):
        candidates += [named, *subfolders(named), *subfolders(named.parent)]
    return list(dict.fromkeys(candidates))


def _only_annotation_folder(path: Path, annotations: Path | None, xml_dirs: list[Path]) -> Path:
    if annotations is not None:
        return annotations
    if path in xml_dirs:  # XML files directly in the folder named (their images may be absent)
        return path
    if len(xml_dirs) == 1:
        return xml_dirs[0]
    if not xml_dirs:
        raise DatasetError(path, f"no folder of *.xml annotation files in or beside it: {ASK_ANNOTATIONS}")
    shown = ", ".join(_short(x, path) for x in xml_dirs)
    raise DatasetError(
        path, f"several folders of XML files ({shown}), none named like the images: {ASK_ANNOTATIONS}"
    )


def _only_image_folder(
    path: Path, xml_dir: Path, image_root: Path | None, image_dirs: list[Path], require_images: bool
) -> Path:
    if image_root is not None:
        return image_root
    if path in image_dirs:
        return path
    if len(image_dirs) == 1:
        return image_dirs[0]
    if image_dirs:
        shown = ", ".join(_short(i, path) for i in image_dirs)
        raise DatasetError(
            path, f"several image folders ({shown}), none named like the XML files: {ASK_IMAGES}"
        )
    if xml_dir == path:  # XML only, e.g. scoring without the images: they would be beside the XML
        return path
    if require_images:
        raise DatasetError(
            path, f"image directory not found (no images in it or its subfolders): {ASK_IMAGES}"
        )
    # Scoring without the images: they are taken to be in images/ beside the XML folder (raccoon's layout).
    return path / "images"


def _short(folder: Path, root: Path) -> str:
    """``folder`` relative to the data set root where it lies inside it, for short messages."""
    try:
        return str(folder.relative_to(root)) + "/" if folder != root else f"{root.name}/"
    except ValueError:
        return str(folder)


def _absolute(folder: str | Path) -> Path:
    return Path(os.path.abspath(folder))
