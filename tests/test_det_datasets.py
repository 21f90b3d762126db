"""Readers on tiny data sets made in tmp_path: every repair, every error path, every layout."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from backbone.image_io import read_image_rgb
from detect.datasets import (
    DatasetError,
    open_detection_dataset,
    read_coco,
    read_ilsvrc_det,
    read_name_list,
    read_synset_mapping,
    read_voc,
    read_xml_folder,
    write_coco_json,
)


def save_image(path: Path, width: int, height: int, mode: str = "RGB", fmt: str = "JPEG") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    colour = {"RGB": (200, 30, 30), "RGBA": (10, 200, 10, 128), "L": 90, "P": 3, "CMYK": (0, 200, 200, 0)}[
        mode
    ]
    Image.new(mode, (width, height), colour).save(path, format=fmt)
    return path


def voc_xml(
    objects: list[tuple], size: tuple[int, int] | None = (0, 0), filename: str | None = None, extra: str = ""
) -> str:
    """objects: (name, xmin, ymin, xmax, ymax[, difficult])."""
    parts = ["<annotation>"]
    if filename:
        parts.append(f"<filename>{filename}</filename>")
    if size is not None:
        parts.append(f"<size><width>{size[0]}</width><height>{size[1]}</height><depth>3</depth></size>")
    for obj in objects:
        name, x1, y1, x2, y2 = obj[:5]
        difficult = obj[5] if len(obj) > 5 else 0
        parts.append(
            f"<object><name>{name}</name><difficult>{difficult}</difficult><bndbox><xmin>{x1}</xmin>"
            f"<ymin>{y1}</ymin><xmax>{x2}</xmax><ymax>{y2}</ymax></bndbox></object>"
        )
    return "".join(parts) + extra + "</annotation>"


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture
def dirty_folder(tmp_path: Path) -> Path:
    """A flat folder with every defect the readers repair."""
    folder = tmp_path / "dirty"
    save_image(folder / "a.jpg", 100, 80)
    write(
        folder / "a.xml",
        voc_xml([("cat", 1, 1, 10, 20), ("dog", 90, 70, 120, 95, 1), ("cat", 50, 5, 40, 30)]),
    )
    save_image(folder / "b.jpg", 64, 48, "RGBA", "PNG")  # PNG content behind .jpg
    write(
        folder / "b.xml",
        voc_xml([("dog", 5, 5, 4, 30), ("cat", 70, 60, 90, 70), ("dog", 0, 0, 64, 48)], (640, 480)),
    )
    save_image(folder / "c.jpg", 32, 32, "L")
    write(folder / "c.xml", voc_xml([], (32, 32)))
    save_image(folder / "d.jpg", 40, 30, "CMYK")
    write(folder / "d.xml", voc_xml([("cat", 2, 3, 40, 30)], None))
    save_image(folder / "e.png", 20, 20, "P", "PNG")
    write(folder / "e.xml", voc_xml([("dog", 1, 1, 20, 20)], (20, 20)))
    save_image(folder / "orphan.JPG", 8, 8)  # no XML: not loaded, but reported
    return folder


def test_folder_repairs_and_reports(dirty_folder: Path) -> None:
    dataset, report = read_xml_folder(dirty_folder)
    assert dataset.class_names == ["cat", "dog"]
    assert [Path(r.file_name).name for r in dataset.records] == ["a.jpg", "b.jpg", "c.jpg", "d.jpg", "e.png"]
    assert [r.image_id for r in dataset.records] == [1, 2, 3, 4, 5]
    a, b, c, d, e = dataset.records
    # VOC 1-based inclusive -> continuous: x1 = xmin - 1, x2 = xmax; (90..120) clipped to the 100 px width.
    np.testing.assert_array_equal(a.boxes, [[0, 0, 10, 20], [89, 69, 100, 80]])
    assert a.labels.tolist() == [0, 1] and a.difficult.tolist() == [False, True]
    assert (b.width, b.height) == (64, 48)  # the annotated 640x480 is replaced
    # xmax = xmin - 1 is zero width in the +1 convention (xmax = xmin is one pixel wide).
    np.testing.assert_array_equal(b.boxes, [[0, 0, 64, 48]])  # zero-width and outside boxes dropped
    assert len(c.boxes) == 0 and (c.width, c.height) == (32, 32)
    assert (d.width, d.height) == (40, 30)
    np.testing.assert_array_equal(e.boxes, [[0, 0, 20, 20]])
    assert report.counts() == {
        "size_zero_fixed": 1,
        "size_mismatch_fixed": 1,
        "size_missing_fixed": 1,
        "box_clipped": 2,  # a's dog (x and y), b's xmin=0 box
        "box_inverted_dropped": 1,
        "box_zero_area_dropped": 1,
        "box_outside_dropped": 1,
        "difficult_kept": 1,
        "image_without_objects": 1,
        "content_not_extension": 1,
        "content_not_rgb": 4,
        "image_without_annotation_ignored": 1,
    }
    assert report.files("box_inverted_dropped") == [str(dirty_folder / "a.xml")]
    assert report.files("content_not_extension") == [str(dirty_folder / "b.jpg")]
    lines = report.lines()
    assert any("inverted boxes dropped" in line and "a.xml" in line for line in lines)


def test_real_size_equals_decoded_size_for_any_content(dirty_folder: Path) -> None:
    dataset, _ = read_xml_folder(dirty_folder)
    for record in dataset.records:
        assert read_image_rgb(record.file_name).shape == (record.height, record.width, 3)


def test_folder_with_separate_xml_dir_and_name_list(tmp_path: Path) -> None:
    for i in (1, 2, 3):
        save_image(tmp_path / "images" / f"r-{i}.jpg", 50, 40)
        write(tmp_path / "annotations" / f"r-{i}.xml", voc_xml([("raccoon", 2, 2, 30, 30)] * i, (50, 40)))
    csv_list = write(tmp_path / "split.csv", "filename,width\nr-3.jpg,50\nr-3.jpg,50\nr-1.jpg,50\n")
    txt_list = write(tmp_path / "split.txt", "r-2\n\nr-1 extra\n")
    assert read_name_list(csv_list) == ["r-3.jpg", "r-1.jpg"]
    assert read_name_list(txt_list) == ["r-2", "r-1"]
    dataset, _ = open_detection_dataset(tmp_path, names_file=csv_list)
    assert [Path(r.file_name).name for r in dataset.records] == ["r-3.jpg", "r-1.jpg"]
    assert [len(r.boxes) for r in dataset.records] == [3, 1]
    dataset, _ = read_xml_folder(tmp_path / "images", tmp_path / "annotations", read_name_list(txt_list))
    assert [Path(r.file_name).name for r in dataset.records] == ["r-2.jpg", "r-1.jpg"]


@pytest.mark.parametrize(
    ("xml", "message"),
    [
        ("<annotation><object>", "malformed XML"),
        ("<notes/>", "expected <annotation>"),
        (voc_xml([("cat", 1, 1, "ten", 5)]), "<xmax> is 'ten'"),
        ("<annotation><object><name>cat</name></object></annotation>", "without <name> or <bndbox>"),
    ],
)
def test_malformed_xml_is_one_line_error_naming_the_file(tmp_path: Path, xml: str, message: str) -> None:
    save_image(tmp_path / "x.jpg", 10, 10)
    write(tmp_path / "x.xml", xml)
    with pytest.raises(DatasetError, match=message) as info:
        read_xml_folder(tmp_path)
    assert str(info.value).startswith(str(tmp_path / "x.xml")) and "\n" not in str(info.value)


def test_missing_image_unknown_class_and_skip_mode(tmp_path: Path) -> None:
    save_image(tmp_path / "ok.jpg", 10, 10)
    write(tmp_path / "ok.xml", voc_xml([("cat", 1, 1, 5, 5)]))
    write(tmp_path / "lost.xml", voc_xml([("cat", 1, 1, 5, 5)]))
    save_image(tmp_path / "zebra.jpg", 10, 10)
    write(tmp_path / "zebra.xml", voc_xml([("zebra", 1, 1, 5, 5)]))
    with pytest.raises(DatasetError, match=r"lost.xml: image for this annotation not found"):
        read_xml_folder(tmp_path, class_names=["cat"])
    (tmp_path / "lost.xml").unlink()
    with pytest.raises(DatasetError, match=r"zebra.xml: unknown class name\(s\) 'zebra'"):
        read_xml_folder(tmp_path, class_names=["cat"])
    write(tmp_path / "lost.xml", voc_xml([("cat", 1, 1, 5, 5)]))
    write(tmp_path / "broken.xml", "<annotation>")
    dataset, report = read_xml_folder(tmp_path, class_names=["cat"], on_error="skip")
    assert [Path(r.file_name).name for r in dataset.records] == ["ok.jpg"]
    assert report.count("skipped") == 3
    assert any("zebra.xml: unknown class" in s for s in report.files("skipped"))


def test_listed_image_missing_is_an_error(tmp_path: Path) -> None:
    write(tmp_path / "annotations" / "gone.xml", voc_xml([("cat", 1, 1, 5, 5)]))
    (tmp_path / "images").mkdir()
    with pytest.raises(DatasetError, match=r"gone.jpg: image file not found"):
        read_xml_folder(tmp_path / "images", tmp_path / "annotations", ["gone.jpg"])


def test_file_names_never_escape_the_image_root(tmp_path: Path) -> None:
    save_image(tmp_path / "secret.jpg", 10, 10)
    images = tmp_path / "set"
    write(images / "a.xml", voc_xml([("cat", 1, 1, 5, 5)], filename="../secret.jpg"))
    with pytest.raises(DatasetError, match="resolves outside the image root"):
        read_xml_folder(images)
    with pytest.raises(DatasetError, match="resolves outside the image root"):
        read_xml_folder(images, names=["../secret.jpg"])
    coco = {
        "images": [{"id": 1, "file_name": str(tmp_path / "secret.jpg"), "width": 10, "height": 10}],
        "annotations": [],
        "categories": [{"id": 1, "name": "cat"}],
    }
    with pytest.raises(DatasetError, match="resolves outside the image root"):
        read_coco(write(images / "c.json", json.dumps(coco)))


def test_voc_layout(tmp_path: Path) -> None:
    root = tmp_path / "VOC2007"
    write(root / "ImageSets" / "Main" / "test.txt", "000002\n000001\n")
    for name, objects in [("000001", [("dog", 1, 1, 8, 8)]), ("000002", [("person", 2, 2, 9, 9, 1)])]:
        save_image(root / "JPEGImages" / f"{name}.jpg", 12, 12)
        write(root / "Annotations" / f"{name}.xml", voc_xml(objects, (12, 12)))
    dataset, report = read_voc(root, "test")
    assert len(dataset.class_names) == 20 and dataset.category_ids[:2] == [1, 2]
    assert [Path(r.file_name).stem for r in dataset.records] == ["000002", "000001"]
    assert dataset.records[0].labels.tolist() == [14] and dataset.records[0].difficult.tolist() == [True]
    assert report.counts() == {"difficult_kept": 1}
    with pytest.raises(DatasetError, match=r"ImageSets/Main/val.txt: list file not found"):
        read_voc(root, "val")
    with pytest.raises(DatasetError, match="needs an image set"):
        open_detection_dataset(root)
    (root / "Annotations" / "000001.xml").unlink()
    with pytest.raises(DatasetError, match=r"000001.xml: annotation file not found"):
        read_voc(root, "test")


def make_ilsvrc(root: Path) -> None:
    write(root / "map_det.txt", "n01 1 accordion\nn02 2 airplane\n")
    write(root / "ImageSets" / "DET" / "val.txt", "ILSVRC_val_1 7\nILSVRC_val_2 9\nILSVRC_val_3 11\n")
    data, ann = root / "Data" / "DET" / "val", root / "Annotations" / "DET" / "val"
    for name in ("ILSVRC_val_1", "ILSVRC_val_2", "ILSVRC_val_3"):
        save_image(data / f"{name}.JPEG", 30, 20)
    write(ann / "ILSVRC_val_1.xml", voc_xml([("n02", 1, 1, 10, 10), ("n01", 5, 5, 30, 20)], (30, 20)))
    write(ann / "ILSVRC_val_2.xml", voc_xml([], (30, 20)))  # no objects, annotated


def test_ilsvrc_layout_ids_synsets_and_negatives(tmp_path: Path) -> None:
    make_ilsvrc(tmp_path)
    dataset, report = open_detection_dataset(tmp_path)
    assert dataset.class_names == ["accordion", "airplane"]
    assert [r.image_id for r in dataset.records] == [7, 9, 11]  # the devkit's image indices
    assert dataset.records[0].labels.tolist() == [1, 0]
    np.testing.assert_array_equal(dataset.records[0].boxes, [[0, 0, 10, 10], [4, 4, 30, 20]])
    assert len(dataset.records[2].boxes) == 0  # negative-only image without XML is kept
    assert report.counts() == {"image_without_objects": 1, "negative_image_no_annotation": 1}
    write(tmp_path / "ImageSets" / "DET" / "train_1.txt", "ILSVRC_val_1 1\nILSVRC_val_3 -1\n")
    dataset, _ = read_ilsvrc_det(tmp_path, split="val", image_set="train_1")
    assert [r.image_id for r in dataset.records] == [1, 2]  # +1/-1 flags are not ids
    write(tmp_path / "Annotations" / "DET" / "val" / "ILSVRC_val_2.xml", voc_xml([("n99", 1, 1, 5, 5)]))
    with pytest.raises(DatasetError, match=r"ILSVRC_val_2.xml: unknown class name\(s\) 'n99'"):
        read_ilsvrc_det(tmp_path)


def test_ilsvrc_rcnn_val1_val2_lists_read_the_val_folders(tmp_path: Path) -> None:
    make_ilsvrc(tmp_path)  # images and XML only in Data/DET/val, Annotations/DET/val: no val1/val2 folders
    write(tmp_path / "ImageSets" / "DET" / "val1.txt", "ILSVRC_val_1 7\nILSVRC_val_3 11\n")
    write(tmp_path / "ImageSets" / "DET" / "val2.txt", "ILSVRC_val_2 9\n")
    val1, _ = open_detection_dataset(tmp_path, "val1")
    val2, _ = open_detection_dataset(tmp_path, "val2")
    val = tmp_path / "Data" / "DET" / "val"
    assert [r.file_name for r in val1.records] == [
        str(val / "ILSVRC_val_1.JPEG"),
        str(val / "ILSVRC_val_3.JPEG"),
    ]
    assert [r.image_id for r in val1.records] == [7, 11] and [r.image_id for r in val2.records] == [9]
    assert val1.records[0].labels.tolist() == [1, 0]  # boxes from Annotations/DET/val
    write(tmp_path / "ImageSets" / "DET" / "train_1.txt", "n01/n01_1 1\n")
    save_image(tmp_path / "Data" / "DET" / "train" / "n01" / "n01_1.JPEG", 8, 8)
    train_1, _ = open_detection_dataset(tmp_path, "train_1")  # per-class lists: Data/DET/train
    assert train_1.records[0].file_name == str(tmp_path / "Data" / "DET" / "train" / "n01" / "n01_1.JPEG")


def test_synset_mapping_from_meta_det_mat(tmp_path: Path) -> None:
    from scipy.io import savemat

    dtype = [("ILSVRC2014_DET_ID", "O"), ("WNID", "O"), ("name", "O")]
    synsets = np.array(
        [(2, "n02", "airplane"), (201, "n99", "vehicle"), (1, "n01", "accordion")], dtype=dtype
    )
    savemat(tmp_path / "meta_det.mat", {"synsets": synsets})
    assert read_synset_mapping(tmp_path / "meta_det.mat") == [("n01", "accordion"), ("n02", "airplane")]
    assert read_synset_mapping(write(tmp_path / "m.txt", "n05 bird of prey\nn04 cat\n")) == [
        ("n05", "bird of prey"),
        ("n04", "cat"),
    ]
    with pytest.raises(DatasetError, match="line 1"):
        read_synset_mapping(write(tmp_path / "bad.txt", "n01\n"))


def coco_dict(tmp_path: Path) -> dict:
    save_image(tmp_path / "img" / "one.jpg", 50, 40)
    save_image(tmp_path / "img" / "two.jpg", 30, 30, "RGBA", "PNG")
    return {
        "images": [
            {"id": 5, "file_name": "img/one.jpg", "width": 50, "height": 40},
            {"id": 3, "file_name": "img/two.jpg", "width": 0, "height": 0},
        ],
        "annotations": [
            {"id": 1, "image_id": 5, "category_id": 9, "bbox": [10, 10, 50, 10], "area": 500, "iscrowd": 0},
            {"id": 2, "image_id": 5, "category_id": 4, "bbox": [1, 2, 3, 4], "area": 12, "iscrowd": 1},
            {"id": 3, "image_id": 5, "category_id": 4, "bbox": [1, 2, 0, 4], "area": 0, "iscrowd": 0},
        ],
        "categories": [{"id": 9, "name": "zebra"}, {"id": 4, "name": "ant"}],
    }


def test_coco_reader_and_round_trip(tmp_path: Path) -> None:
    path = write(tmp_path / "gt.json", json.dumps(coco_dict(tmp_path)))
    dataset, report = read_coco(path)
    assert dataset.class_names == ["ant", "zebra"] and dataset.category_ids == [4, 9]
    assert [r.image_id for r in dataset.records] == [3, 5]
    one = dataset.records[1]
    np.testing.assert_array_equal(one.boxes, [[10, 10, 50, 20], [1, 2, 4, 6]])
    assert one.labels.tolist() == [1, 0] and one.difficult.tolist() == [False, True]
    assert report.counts() == {
        "box_clipped": 1,
        "box_zero_area_dropped": 1,
        "crowd_as_difficult": 1,
        "size_zero_fixed": 1,
        "image_without_objects": 1,
        "content_not_extension": 1,
        "content_not_rgb": 1,
    }
    out = write_coco_json(dataset, tmp_path / "out" / "conv.json")
    written = json.loads(out.read_text())
    assert written["info"]["image_root"] == str((tmp_path / "img").resolve())
    assert {i["file_name"] for i in written["images"]} == {"one.jpg", "two.jpg"}
    again, again_report = read_coco(out)  # finds the images through info.image_root
    assert again.class_names == dataset.class_names and again.category_ids == dataset.category_ids
    for first, second in zip(dataset.records, again.records, strict=True):
        assert (first.image_id, first.width, first.height) == (second.image_id, second.width, second.height)
        np.testing.assert_array_equal(first.boxes, second.boxes)
        np.testing.assert_array_equal(first.labels, second.labels)
        np.testing.assert_array_equal(first.difficult, second.difficult)
    assert again_report.count("box_clipped") == 0 and again_report.count("crowd_as_difficult") == 1


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: "{not json", "malformed JSON"),
        (lambda d: [], "top level is not an object"),
        (lambda d: {**d, "images": None}, "'images' missing or not a list"),
        (lambda d: {**d, "images": d["images"] + d["images"][:1]}, "image ids must be unique integers"),
        (
            lambda d: {**d, "images": [{**d["images"][0], "width": "wide"}]},
            r"images\[0\].width is not a number",
        ),
        (lambda d: {**d, "categories": [{"id": 1}]}, r"categories\[0\] lacks one of id, name"),
        (lambda d: {**d, "annotations": [{**d["annotations"][0], "bbox": [1, 2]}]}, "bbox is not 4 numbers"),
        (lambda d: {**d, "annotations": [{**d["annotations"][0], "image_id": 77}]}, "unknown image id 77"),
        (
            lambda d: {**d, "annotations": [{**d["annotations"][0], "category_id": 2}]},
            r"unknown category id\(s\) \[2\]",
        ),
        (
            lambda d: {**d, "images": [{**d["images"][0], "file_name": "img/nope.jpg"}]},
            "nope.jpg: image file not found",
        ),
    ],
)
def test_coco_errors_name_the_file(tmp_path: Path, mutate, message: str) -> None:
    data = mutate(coco_dict(tmp_path))
    path = write(tmp_path / "bad.json", data if isinstance(data, str) else json.dumps(data))
    with pytest.raises(DatasetError, match=message) as info:
        read_coco(path)
    assert str(tmp_path) in str(info.value) and "\n" not in str(info.value)


def test_undecodable_image_is_skipped_by_name_or_an_error(tmp_path: Path) -> None:
    write(tmp_path / "junk.jpg", "this is not an image")
    write(tmp_path / "junk.xml", voc_xml([("cat", 1, 1, 5, 5)]))
    Image.new("RGB", (20, 10)).save(tmp_path / "good.jpg")
    write(tmp_path / "good.xml", voc_xml([("cat", 1, 1, 5, 5)]))
    dataset, report = read_xml_folder(tmp_path)
    assert [Path(r.file_name).name for r in dataset.records] == ["good.jpg"]
    assert any("junk.jpg: not a decodable image" in line for line in report.files("skipped"))
    with pytest.raises(DatasetError, match=r"junk.jpg: not a decodable image"):
        read_xml_folder(tmp_path, on_bad_image="error")


def test_unrecognised_layout(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="unrecognised layout"):
        open_detection_dataset(tmp_path)
    with pytest.raises(DatasetError, match="not found"):
        open_detection_dataset(tmp_path / "missing")
