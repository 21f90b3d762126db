"""Data sets as users have them: XML in a folder of any name, folders named explicitly, own class names."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import cv2
import numpy as np
import pytest
from tool_loader import load_tool

from backbone.runtime import run_tool
from backbone.runtime.config import ConfigError, config_from_dict
from backbone.runtime.errors import UserError
from detect.datasets import VOC_CLASSES, DatasetError, is_voc_year_folder, open_detection_dataset
from detect.datasets.coco import write_coco_json
from detect.datasets.spec import DatasetSpec, open_dataset_spec, open_dataset_specs

convert_dataset = load_tool("convert_dataset")
test_det = load_tool("test_det")

# stem -> objects (name, xmin, ymin, xmax, ymax), VOC's 1-based inclusive pixels on a 32x32 image
OBJECTS = {
    "b1": [("zebra", 2, 2, 20, 20)],
    "a2": [("aardvark", 4, 4, 30, 28), ("zebra", 1, 1, 10, 10)],
    "c3": [("aardvark", 5, 6, 25, 26)],
}


def save_image(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), np.full((32, 32, 3), 127, np.uint8))
    return path


def write_xml(path: Path, objects: list[tuple]) -> Path:
    body = "".join(
        f"<object><name>{n}</name><bndbox><xmin>{a}</xmin><ymin>{b}</ymin><xmax>{c}</xmax>"
        f"<ymax>{d}</ymax></bndbox></object>"
        for n, a, b, c, d in objects
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"<annotation><size><width>32</width><height>32</height></size>{body}</annotation>")
    return path


def make_set(root: Path, image_dir: str = "images", xml_dir: str = "annots", objects=None) -> Path:
    """``root/image_dir/*.jpg`` with ``root/xml_dir/*.xml``."""
    for stem, objs in (objects or OBJECTS).items():
        save_image(root / image_dir / f"{stem}.jpg")
        write_xml(root / xml_dir / f"{stem}.xml", objs)
    return root


def make_voc_layout(root: Path) -> Path:
    """A set in VOC's devkit layout (Annotations/, JPEGImages/, ImageSets/Main/)."""
    make_set(root, "JPEGImages", "Annotations")
    (root / "ImageSets" / "Main").mkdir(parents=True)
    (root / "ImageSets" / "Main" / "train.txt").write_text("b1\na2\nc3\n")
    return root


def names(dataset) -> list[str]:
    return [Path(r.file_name).name for r in dataset.records]


def one_line(error: pytest.ExceptionInfo) -> str:
    text = str(error.value)
    assert "\n" not in text
    return text


@pytest.mark.parametrize("xml_dir", ["annots", "xml", "labels"])
def test_sibling_xml_folder_of_any_name_is_found(tmp_path: Path, xml_dir: str) -> None:
    root = make_set(tmp_path / "set", "images", xml_dir)
    (root / "notes").mkdir()  # an unrelated folder is not a candidate
    (root / "notes" / "readme.txt").write_text("hello")
    dataset, _ = open_detection_dataset(root)
    assert names(dataset) == ["a2.jpg", "b1.jpg", "c3.jpg"]  # sorted XML order
    assert {Path(r.file_name).parent for r in dataset.records} == {root / "images"}
    assert [len(r.boxes) for r in dataset.records] == [2, 1, 1]
    # Naming the image folder itself: its XML lives in a sibling folder.
    by_images, _ = open_detection_dataset(root / "images")
    assert names(by_images) == names(dataset)
    np.testing.assert_array_equal(by_images.records[0].boxes, dataset.records[0].boxes)


def test_explicit_annotation_and_image_folders(tmp_path: Path) -> None:
    root = make_set(tmp_path / "set", "pics", "old_xml")
    make_set(root, "pics", "new_xml", {stem: [("zebra", 1, 1, 32, 32)] for stem in OBJECTS})
    with pytest.raises(DatasetError, match="several"):
        open_detection_dataset(root)
    dataset, _ = open_detection_dataset(root, annotations=root / "new_xml")
    assert [r.boxes.tolist() for r in dataset.records] == [[[0, 0, 32, 32]]] * 3
    assert {Path(r.file_name).parent for r in dataset.records} == {root / "pics"}
    # image_root is honoured for a folder layout: the images elsewhere, named by it.
    elsewhere = tmp_path / "photos"
    (root / "pics").rename(elsewhere)
    dataset, _ = open_detection_dataset(root, image_root=elsewhere, annotations=root / "old_xml")
    assert {Path(r.file_name).parent for r in dataset.records} == {elsewhere}
    assert [len(r.boxes) for r in dataset.records] == [2, 1, 1]
    # Only image_root given: its XML is found from the content (only old_xml is named like the images).
    for stem in OBJECTS:
        (root / "new_xml" / f"{stem}.xml").rename(root / "new_xml" / f"other_{stem}.xml")
    dataset, _ = open_detection_dataset(root, image_root=elsewhere)
    assert [len(r.boxes) for r in dataset.records] == [2, 1, 1]


def test_spec_and_config_name_the_folders_and_classes(tmp_path: Path) -> None:
    root = make_set(tmp_path / "set", "pics", "meta")
    make_set(root, "pics", "meta_copy")
    raw = {"path": str(root), "annotations": str(root / "meta"), "classes": ["zebra", "aardvark"]}
    spec = config_from_dict(DatasetSpec, raw, source="cfg.yaml")
    assert spec.annotations == str(root / "meta") and spec.classes == ("zebra", "aardvark")
    dataset, _ = open_dataset_spec(spec)
    assert dataset.class_names == ["zebra", "aardvark"] and len(dataset.records) == 3
    # A checkpoint's plain config dict (lists) rebuilds an equal, hashable entry.
    assert hash(DatasetSpec(**raw)) == hash(spec)
    with pytest.raises(ConfigError, match="classes expects"):
        config_from_dict(DatasetSpec, {**raw, "classes": "zebra"}, source="cfg.yaml")
    with pytest.raises(DatasetError, match="several"):
        open_dataset_spec(DatasetSpec(str(root)))


def test_two_candidate_folders_is_one_line_error(tmp_path: Path) -> None:
    root = make_set(tmp_path / "set", "images", "annots")
    make_set(root, "images", "xml")
    with pytest.raises(DatasetError) as error:
        open_detection_dataset(root)
    message = one_line(error)
    assert message.startswith(f"{root}: several image and annotation folders match")
    assert "annots/" in message and "xml/" in message and "annotations (--annotations)" in message


def test_an_option_the_layout_does_not_use_is_an_error(tmp_path: Path) -> None:
    root = make_set(tmp_path / "set", "images", "annots")
    with pytest.raises(DatasetError) as error:
        open_detection_dataset(root, image_set="train")
    assert "image_set (--image-set) is not used for a folder of images + XML" in one_line(error)
    dataset, _ = open_detection_dataset(root)
    json_path = write_coco_json(dataset, tmp_path / "set.json")
    for option, value, flag in [
        ("annotations", root / "annots", "annotations (--annotations)"),
        ("class_names", ["zebra"], "classes (--classes)"),
        ("names_file", tmp_path / "list.txt", "names_file (--names-file)"),
    ]:
        with pytest.raises(DatasetError) as error:
            open_detection_dataset(json_path, **{option: value})
        assert f"{flag} is not used for a COCO JSON file" in one_line(error)
    voc = make_voc_layout(tmp_path / "VOC2007")
    with pytest.raises(DatasetError) as error:
        open_detection_dataset(voc, image_set="train", image_root=voc / "JPEGImages")
    assert "image_root (--image-root) is not used for a VOC-layout folder" in one_line(error)


def test_classes_discovered_sorted_and_logged_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="detect.datasets.voc")
    dataset, _ = open_detection_dataset(make_set(tmp_path / "set"))
    assert dataset.class_names == ["aardvark", "zebra"]
    assert dataset.records[0].labels.tolist() == [0, 1]  # a2: aardvark, zebra
    found = [r.getMessage() for r in caplog.records if "classes found in the annotations" in r.getMessage()]
    assert len(found) == 1 and found[0].endswith("aardvark, zebra")
    # A set in VOC's layout that is not a VOC year folder has its own classes too.
    custom = make_voc_layout(tmp_path / "my_animals")
    assert not is_voc_year_folder(custom)
    dataset, _ = open_detection_dataset(custom, image_set="train")
    assert dataset.class_names == ["aardvark", "zebra"] and names(dataset) == ["b1.jpg", "a2.jpg", "c3.jpg"]


def test_classes_given_set_the_label_order(tmp_path: Path) -> None:
    root = make_set(tmp_path / "set")
    dataset, _ = open_detection_dataset(root, class_names=["zebra", "okapi", "aardvark"])
    assert dataset.class_names == ["zebra", "okapi", "aardvark"]
    assert dataset.category_ids == [1, 2, 3]
    assert dataset.records[0].labels.tolist() == [2, 0]  # a2: aardvark, zebra
    voc_layout, _ = open_detection_dataset(
        make_voc_layout(tmp_path / "VOC2012"), image_set="train", class_names=["zebra", "aardvark"]
    )
    assert voc_layout.class_names == ["zebra", "aardvark"] and voc_layout.records[1].labels.tolist() == [1, 0]
    with pytest.raises(DatasetError, match=r"'zebra' more than once"):
        open_detection_dataset(root, class_names=["zebra", "zebra", "aardvark"])


def test_a_name_missing_from_the_classes_is_one_line_error(tmp_path: Path) -> None:
    root = make_set(tmp_path / "set")
    with pytest.raises(DatasetError) as error:
        open_detection_dataset(root, class_names=["zebra"])
    message = one_line(error)
    assert message.startswith(f"{root / 'annots' / 'a2.xml'}: unknown class name(s) 'aardvark'")
    assert "`classes` (--classes)" in message


def test_entries_of_one_split_with_other_classes_is_one_line_error(tmp_path: Path) -> None:
    first = make_set(tmp_path / "first")
    second = make_set(tmp_path / "second", objects={"d4": [("okapi", 2, 2, 20, 20)]})
    with pytest.raises(DatasetError) as error:
        open_dataset_specs((DatasetSpec(str(first)), DatasetSpec(str(second))))
    assert one_line(error).startswith(f"{second}: classes ['okapi'] differ from {first}'s")


def test_a_real_voc_year_folder_keeps_voc_20_classes(tmp_path: Path) -> None:
    objects = {"000002": [("person", 2, 2, 9, 9)], "000001": [("dog", 1, 1, 8, 8)]}
    root = make_set(tmp_path / "VOCdevkit" / "VOC2007", "JPEGImages", "Annotations", objects)
    (root / "ImageSets" / "Main").mkdir(parents=True)
    (root / "ImageSets" / "Main" / "test.txt").write_text("000002\n000001\n")
    assert is_voc_year_folder(root)
    dataset, _ = open_detection_dataset(root, image_set="test")
    assert tuple(dataset.class_names) == VOC_CLASSES
    assert [r.labels.tolist() for r in dataset.records] == [[14], [11]]  # person, dog
    # The same files outside a VOC<year> folder: only the names they use.
    renamed = root.rename(tmp_path / "pets")
    dataset, _ = open_detection_dataset(renamed, image_set="test")
    assert dataset.class_names == ["dog", "person"]
    # A name outside VOC's 20 in a VOC year folder says how to name the classes.
    back = renamed.rename(tmp_path / "VOC2012")
    write_xml(back / "Annotations" / "000001.xml", [("okapi", 1, 1, 8, 8)])
    with pytest.raises(DatasetError) as error:
        open_detection_dataset(back, image_set="test")
    message = one_line(error)
    assert message.startswith(f"{back / 'Annotations' / '000001.xml'}: unknown class name(s) 'okapi'")
    assert "VOC's 20 classes" in message and "`classes`" in message


def test_tools_take_the_folders_and_classes_from_flags(tmp_path: Path, capsys) -> None:
    root = make_set(tmp_path / "set", "images", "annots")
    make_set(root, "images", "xml")
    out = tmp_path / "set.json"
    convert = [str(root), "--out", str(out)]
    assert run_tool(convert_dataset.main, convert_dataset.get_args_parser().parse_args(convert)) == 2
    assert "several image and annotation folders match" in capsys.readouterr().err.strip().splitlines()[-1]
    flags = ["--annotations", str(root / "xml"), "--classes", "zebra,aardvark"]
    assert run_tool(convert_dataset.main, convert_dataset.get_args_parser().parse_args(convert + flags)) == 0
    categories = json.loads(out.read_text())["categories"]
    assert [c["name"] for c in categories] == ["zebra", "aardvark"]
    parser = test_det.get_args_parser()
    spec = test_det.spec_from_flags(parser.parse_args(["--checkpoint", "m.pt", "--data", str(root), *flags]))
    assert spec == DatasetSpec(str(root), annotations=str(root / "xml"), classes=("zebra", "aardvark"))
    with pytest.raises(UserError, match=r"^--image-root, --annotations: only used with --data"):
        test_det.spec_from_flags(
            parser.parse_args(["--checkpoint", "m.pt", "--image-root", "x", "--annotations", "y"])
        )
