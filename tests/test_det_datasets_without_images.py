"""Readers with ``require_images=False`` (scoring without the image files): sizes from annotations."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from detect.datasets import DatasetError, open_detection_dataset, read_coco, read_ilsvrc_det


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def xml(objects: list[tuple], size: tuple[int, int] | None) -> str:
    sized = f"<size><width>{size[0]}</width><height>{size[1]}</height></size>" if size else ""
    body = "".join(
        f"<object><name>{n}</name><bndbox><xmin>{a}</xmin><ymin>{b}</ymin><xmax>{c}</xmax>"
        f"<ymax>{d}</ymax></bndbox></object>"
        for n, a, b, c, d in objects
    )
    return f"<annotation>{sized}{body}</annotation>"


def coco_file(root: Path, sizes: list[tuple[int, int] | None]) -> Path:
    images = []
    for i, size in enumerate(sizes, start=1):
        entry = {"id": i, "file_name": f"img/{i}.jpg"}
        if size is not None:
            entry |= {"width": size[0], "height": size[1]}
        images.append(entry)
    annotations = [
        {"id": i, "image_id": i, "category_id": 3, "bbox": [1, 1, 100, 10], "iscrowd": 0}
        for i in range(1, len(sizes) + 1)
    ]
    data = {"images": images, "annotations": annotations, "categories": [{"id": 3, "name": "cat"}]}
    return write(root / "gt.json", json.dumps(data))


def test_coco_sizes_from_the_json_when_the_images_are_absent(tmp_path: Path) -> None:
    path = coco_file(tmp_path, [(50, 40), (80, 60)])
    with pytest.raises(DatasetError, match=r"img/1.jpg: image file not found"):
        read_coco(path)  # training's default: every image must be there
    # One image present, and its real size (30x20) disagrees with the JSON: the file wins, counted.
    (tmp_path / "img").mkdir()
    Image.new("RGB", (30, 20)).save(tmp_path / "img" / "1.jpg")
    dataset, report = read_coco(path, require_images=False)
    assert [(r.width, r.height) for r in dataset.records] == [(30, 20), (80, 60)]
    assert report.count("size_mismatch_fixed") == 1 and report.count("size_from_annotation") == 1
    assert dataset.records[0].boxes[0].tolist() == [1, 1, 30, 11]  # clipped to the real width
    assert dataset.records[1].boxes[0].tolist() == [1, 1, 80, 11]  # clipped to the annotated width


@pytest.mark.parametrize(("size", "given"), [(None, "no size"), ((0, 0), "size 0x0")])
def test_coco_absent_image_without_a_size_is_an_error(tmp_path: Path, size, given: str) -> None:
    path = coco_file(tmp_path, [size])
    with pytest.raises(DatasetError, match=rf"1.jpg: image file not found, and its annotation has {given}"):
        read_coco(path, require_images=False)


def test_voc_folder_of_xml_only(tmp_path: Path) -> None:
    write(tmp_path / "a.xml", xml([("cat", 1, 1, 10, 10)], (40, 30)))
    write(tmp_path / "b.xml", xml([], None))  # no objects, no size: kept, the size does not matter
    with pytest.raises(DatasetError, match="image for this annotation not found"):
        open_detection_dataset(tmp_path)
    dataset, report = open_detection_dataset(tmp_path, require_images=False)
    assert [(r.width, r.height) for r in dataset.records] == [(40, 30), (0, 0)]
    assert [Path(r.file_name).name for r in dataset.records] == ["a.jpg", "b.jpg"]
    assert report.count("size_from_annotation") == 1 and report.count("size_unknown_no_objects") == 1


def test_images_and_annotations_layout_without_the_images_folder(tmp_path: Path) -> None:
    write(tmp_path / "annotations" / "a.xml", xml([("cat", 1, 1, 10, 10)], (40, 30)))
    with pytest.raises(DatasetError, match="image directory not found"):
        open_detection_dataset(tmp_path)
    dataset, _ = open_detection_dataset(tmp_path, require_images=False)
    assert (dataset.records[0].width, dataset.records[0].height) == (40, 30)
    assert Path(dataset.records[0].file_name).parent == tmp_path / "images"


def make_ilsvrc(root: Path) -> None:
    write(root / "map_det.txt", "n01 1 dog\nn02 2 cat\n")
    write(root / "ImageSets" / "DET" / "val.txt", "v1 7\nv2 9\nv3 11\n")
    ann = root / "Annotations" / "DET" / "val"
    write(ann / "v1.xml", xml([("n02", 1, 1, 10, 10), ("n01", 5, 5, 90, 20)], (30, 20)))
    write(ann / "v2.xml", xml([], (30, 20)))  # v3: no XML, a negative image


def test_ilsvrc_without_data_det(tmp_path: Path) -> None:
    make_ilsvrc(tmp_path)
    with pytest.raises(DatasetError, match=r"v1.JPEG: image file not found"):
        open_detection_dataset(tmp_path)
    dataset, report = open_detection_dataset(tmp_path, require_images=False)
    assert [r.image_id for r in dataset.records] == [7, 9, 11]
    assert [(r.width, r.height) for r in dataset.records] == [(30, 20), (30, 20), (0, 0)]
    assert dataset.records[0].boxes[1].tolist() == [4, 4, 30, 20]  # clipped to the annotated size
    assert report.count("negative_image_no_annotation") == 1
    # With the images there the files are read, as before.
    for name, size in (("v1", (30, 20)), ("v2", (30, 20)), ("v3", (12, 8))):
        path = tmp_path / "Data" / "DET" / "val" / f"{name}.JPEG"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", size).save(path, format="JPEG")
    dataset, report = read_ilsvrc_det(tmp_path, require_images=False)
    assert dataset.records[2].width == 12 and report.count("size_from_annotation") == 0
