"""The bad-input corpus (issue 15): every defect in annotations or detections ends in a repair with a
logged count, a skip with a logged count and the file name, or one ``DatasetError`` line naming the
file and the problem (exit code 2 from the tools). Each case is tiny and made in tmp_path."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO_ROOT
from PIL import Image
from tool_loader import load_tool

from backbone.runtime import run_tool
from backbone.runtime.errors import UserError
from detect.datasets import DatasetError, LoadReport, open_detection_dataset, read_coco, read_xml_folder
from detect.datasets.coco import load_json
from detect.datasets.common import REPORT_KINDS
from detect.evaluation import detections_from_coco_results

SIZE = "<size><width>20</width><height>16</height></size>"  # the real size of every test image


def image(path: Path, width: int = 20, height: int = 16) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (width, height), (90, 30, 30)).save(path)
    return path


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def obj(name="cat", xmin=2, ymin=2, xmax=10, ymax=10, difficult="0") -> str:
    box = f"<xmin>{xmin}</xmin><ymin>{ymin}</ymin><xmax>{xmax}</xmax><ymax>{ymax}</ymax>"
    return f"<object><name>{name}</name><difficult>{difficult}</difficult><bndbox>{box}</bndbox></object>"


def xml(*objects: str, size: str = SIZE, head: str = "") -> str:
    return f"<annotation>{head}{size}{''.join(objects)}</annotation>"


def logged(report: LoadReport, kind: str, count: int, file: str) -> None:
    """The report's log line for ``kind`` carries ``count`` and names ``file``."""
    lines = [line for line in report.lines() if f": {REPORT_KINDS[kind]}: " in line]
    assert len(lines) == 1, report.lines()
    assert f": {REPORT_KINDS[kind]}: {count} (" in lines[0] and file in lines[0], lines[0]
    assert report.count(kind) == count


def one_line_error(info: pytest.ExceptionInfo, file: Path | str, problem: str) -> None:
    message = str(info.value)
    assert isinstance(info.value, UserError) and "\n" not in message
    assert message.startswith(str(file)), message
    assert re.search(problem, message), message


# --- VOC XML (folder layout; VOC and ILSVRC parse with the same code) --------------------------------

XML_ERRORS = {
    "truncated": ("<annotation><object>", "malformed XML"),
    "empty file": ("", "malformed XML"),
    "not VOC": ("<notes/>", "expected <annotation>"),
    "object without bndbox": (xml("<object><name>cat</name></object>"), "without <name> or <bndbox>"),
    "missing ymax": (xml(obj().replace("<ymax>10</ymax>", "")), "<ymax> is None, not a number"),
    "word for a number": (xml(obj(xmax="ten")), "<xmax> is 'ten', not a number"),
    "NaN coordinate": (xml(obj(xmin="nan")), "<xmin> is 'nan', not a finite number"),
    "infinite coordinate": (xml(obj(ymax="1e999")), "<ymax> is '1e999', not a finite number"),
    "NaN size": (xml(size="<size><width>nan</width><height>16</height></size>"), "<width> is 'nan'"),
    "NaN difficult": (xml(obj(difficult="nan")), "<difficult> is 'nan'"),
    "unknown class name": (xml(obj("zebra")), r"unknown class name\(s\) 'zebra'.*`classes`"),
    "leaves the image root": (
        xml(obj(), head="<filename>../secret.jpg</filename>"),
        "outside the image root",
    ),
}


@pytest.mark.parametrize("case", list(XML_ERRORS))
def test_bad_xml_is_one_line_error_or_a_counted_skip(tmp_path: Path, case: str) -> None:
    text, problem = XML_ERRORS[case]
    folder = tmp_path / "set"
    image(folder / "ok.jpg")
    write(folder / "ok.xml", xml(obj()))
    if case == "leaves the image root":  # no bad.jpg: the image is looked up by <filename>
        image(tmp_path / "secret.jpg")
    else:
        image(folder / "bad.jpg")
    bad = write(folder / "bad.xml", text)
    with pytest.raises(DatasetError) as info:
        read_xml_folder(folder, class_names=["cat"])
    one_line_error(info, bad, problem)
    dataset, report = read_xml_folder(folder, class_names=["cat"], on_error="skip")
    assert [Path(r.file_name).name for r in dataset.records] == ["ok.jpg"]
    logged(report, "skipped", 1, str(bad))


def test_annotation_path_that_is_a_directory(tmp_path: Path) -> None:
    image(tmp_path / "a.jpg")
    (tmp_path / "a.xml").mkdir()
    with pytest.raises(DatasetError) as info:
        read_xml_folder(tmp_path)
    one_line_error(info, tmp_path / "a.xml", "cannot read annotation file")


# (objects, size element, boxes after loading, report kind, count)
XML_FIXES = {
    "partly outside": ([obj(xmin=2, xmax=30)], SIZE, [[1, 1, 20, 10]], "box_clipped", 1),
    "negative coordinates": ([obj(xmin=-3, ymin=-1)], SIZE, [[0, 0, 10, 10]], "box_clipped", 1),
    "entirely outside": ([obj(xmin=25, xmax=30), obj()], SIZE, [[1, 1, 10, 10]], "box_outside_dropped", 1),
    "zero area": ([obj(xmin=5, xmax=4), obj()], SIZE, [[1, 1, 10, 10]], "box_zero_area_dropped", 1),
    "inverted": ([obj(ymin=9, ymax=3), obj()], SIZE, [[1, 1, 10, 10]], "box_inverted_dropped", 1),
    # The devkit's +1 rule: xmin == xmax is one pixel wide; kept as such, and reported.
    "points": (
        [obj(xmin=5, xmax=5), obj(ymin=7, ymax=7)],
        SIZE,
        [[4, 1, 5, 10], [1, 6, 10, 7]],
        "box_one_pixel_kept",
        2,
    ),
    "size 0x0": (
        [obj()],
        "<size><width>0</width><height>0</height></size>",
        [[1, 1, 10, 10]],
        "size_zero_fixed",
        1,
    ),
    "negative size": (
        [obj()],
        "<size><width>-20</width><height>16</height></size>",
        [[1, 1, 10, 10]],
        "size_mismatch_fixed",
        1,
    ),
    "no size": ([obj()], "", [[1, 1, 10, 10]], "size_missing_fixed", 1),
    "no objects": ([], SIZE, np.zeros((0, 4)), "image_without_objects", 1),
}


@pytest.mark.parametrize("case", list(XML_FIXES))
def test_xml_defects_are_fixed_with_a_logged_count(tmp_path: Path, case: str) -> None:
    objects, size, boxes, kind, count = XML_FIXES[case]
    image(tmp_path / "a.jpg")
    write(tmp_path / "a.xml", xml(*objects, size=size))
    dataset, report = read_xml_folder(tmp_path, class_names=["cat"])
    (record,) = dataset.records
    assert (record.width, record.height) == (20, 16)
    np.testing.assert_array_equal(record.boxes, np.asarray(boxes, np.float32).reshape(-1, 4))
    logged(report, kind, count, "a.xml")


def test_duplicate_voc_image_ids_are_skipped_with_a_count(tmp_path: Path) -> None:
    root = tmp_path / "VOC2007"
    listing = write(root / "ImageSets" / "Main" / "test.txt", "000001\n000002\n000001\n")
    for name in ("000001", "000002"):
        image(root / "JPEGImages" / f"{name}.jpg")
        write(root / "Annotations" / f"{name}.xml", xml(obj("dog")))
    dataset, report = open_detection_dataset(root, "test")
    assert [Path(r.file_name).stem for r in dataset.records] == ["000001", "000002"]
    assert [r.image_id for r in dataset.records] == [1, 2]
    logged(report, "duplicate_listed_skipped", 1, listing.name)


def test_duplicate_names_in_a_folder_split_list_are_skipped_with_a_count(tmp_path: Path) -> None:
    for stem in ("a", "b"):
        image(tmp_path / "images" / f"{stem}.jpg")
        write(tmp_path / "xml" / f"{stem}.xml", xml(obj()))
    listing = write(tmp_path / "split.txt", "b\na\nb.jpg\n")
    dataset, report = open_detection_dataset(tmp_path, names_file=listing)
    assert [Path(r.file_name).name for r in dataset.records] == ["b.jpg", "a.jpg"]
    logged(report, "duplicate_listed_skipped", 1, listing.name)


def make_ilsvrc(root: Path, listing: str) -> Path:
    write(root / "map_det.txt", "n01 1 accordion\n")
    for name in ("val_1", "val_2"):
        image(root / "Data" / "DET" / "val" / f"{name}.JPEG")
        write(root / "Annotations" / "DET" / "val" / f"{name}.xml", xml(obj("n01")))
    return write(root / "ImageSets" / "DET" / "val.txt", listing)


def test_ilsvrc_duplicate_image_index_is_an_error(tmp_path: Path) -> None:
    listing = make_ilsvrc(tmp_path, "val_1 7\nval_2 7\n")
    with pytest.raises(DatasetError) as info:
        open_detection_dataset(tmp_path)
    one_line_error(info, listing, "image index 7 is listed twice")


def test_ilsvrc_name_listed_twice_is_skipped_with_a_count(tmp_path: Path) -> None:
    listing = make_ilsvrc(tmp_path, "val_1 7\nval_2 9\nval_1 7\n")
    dataset, report = open_detection_dataset(tmp_path)
    assert [r.image_id for r in dataset.records] == [7, 9]  # still the devkit's indices
    logged(report, "duplicate_listed_skipped", 1, listing.name)


# --- COCO JSON ---------------------------------------------------------------------------------------


def coco(tmp_path: Path, **changes) -> dict:
    """One 20x16 image ``img/a.jpg`` with one cat; ``changes`` replace image/annotation fields."""
    image(tmp_path / "img" / "a.jpg")
    image_entry = {"id": 1, "file_name": "img/a.jpg", "width": 20, "height": 16}
    annotation = {"id": 1, "image_id": 1, "category_id": 1, "bbox": [2, 2, 8, 8], "iscrowd": 0}
    for key, value in changes.items():
        target = image_entry if key in ("file_name", "width", "height") else annotation
        if value is None:
            target.pop(key)
        else:
            target[key] = value
    return {"images": [image_entry], "annotations": [annotation], "categories": [{"id": 1, "name": "cat"}]}


def with_second_image(data: dict, tmp_path: Path) -> dict:
    """``data`` plus a good image 2 (``img/b.jpg``), so a skipped image 1 leaves something."""
    image(tmp_path / "img" / "b.jpg")
    data["images"].append({"id": 2, "file_name": "img/b.jpg", "width": 20, "height": 16})
    data["annotations"].append({"id": 2, "image_id": 2, "category_id": 1, "bbox": [1, 1, 5, 5]})
    return data


COCO_FILE_ERRORS = {
    "malformed JSON": (lambda d: "{not json", "malformed JSON"),
    "empty file": (lambda d: "", "malformed JSON"),
    "nested too deeply": (lambda d: "[" * 100_000, "malformed JSON"),
    "image without file_name": (
        lambda d: {**d, "images": [{"id": 1}]},
        r"images\[0\] lacks one of id, file_name",
    ),
    "annotation without bbox": (
        lambda d: {**d, "annotations": [{"image_id": 1, "category_id": 1}]},
        r"annotations\[0\] lacks one of image_id, category_id, bbox",
    ),
    "bbox of 3 numbers": (
        lambda d: {**d, "annotations": [{**d["annotations"][0], "bbox": [1, 2, 3]}]},
        "bbox is not 4 numbers",
    ),
    "NaN width": (
        lambda d: {**d, "images": [{**d["images"][0], "width": float("nan")}]},
        r"images\[0\].width is not a finite number",
    ),
    "infinite height": (
        lambda d: {**d, "images": [{**d["images"][0], "height": float("inf")}]},
        r"images\[0\].height is not a finite number",
    ),
    "duplicate image ids": (
        lambda d: {**d, "images": d["images"] * 2},
        "image ids must be unique integers.*id 1 twice",
    ),
    "duplicate category ids": (
        lambda d: {**d, "categories": [{"id": 1, "name": "cat"}, {"id": 1, "name": "dog"}]},
        "category ids must be unique integers.*id 1 twice",
    ),
    "category id not an integer": (
        lambda d: {**d, "categories": [{"id": "x", "name": "dog"}, *d["categories"]]},
        "category ids must be unique integers.*'x'",
    ),
    "duplicate class names": (
        lambda d: {**d, "categories": [*d["categories"], {"id": 2, "name": "cat"}]},
        "category name 'cat' is used twice",
    ),
    "annotation of an unknown image": (
        lambda d: {**d, "annotations": [{**d["annotations"][0], "image_id": 77}]},
        "annotations refer to unknown image id 77",
    ),
    "image id as text": (
        lambda d: {**d, "annotations": [{**d["annotations"][0], "image_id": "1"}]},
        r"annotations\[0\].image_id is '1', not an integer",
    ),
}


@pytest.mark.parametrize("case", list(COCO_FILE_ERRORS))
def test_bad_coco_file_is_one_line_error(tmp_path: Path, case: str) -> None:
    mutate, problem = COCO_FILE_ERRORS[case]
    data = mutate(coco(tmp_path))
    path = write(tmp_path / "gt.json", data if isinstance(data, str) else json.dumps(data))
    with pytest.raises(DatasetError) as info:
        read_coco(path)
    one_line_error(info, path, problem)


COCO_IMAGE_ERRORS = {
    "unknown category id": ({"category_id": 7}, r"image 1: unknown category id\(s\) \[7\]"),
    "NaN coordinate": ({"bbox": [2, float("nan"), 8, 8]}, "box coordinate is not a finite number"),
    "leaves the image root": ({"file_name": "../a.jpg"}, "outside the image root"),
}


@pytest.mark.parametrize("case", list(COCO_IMAGE_ERRORS))
def test_bad_coco_image_is_one_line_error_or_a_counted_skip(tmp_path: Path, case: str) -> None:
    changes, problem = COCO_IMAGE_ERRORS[case]
    path = write(tmp_path / "gt.json", json.dumps(with_second_image(coco(tmp_path, **changes), tmp_path)))
    with pytest.raises(DatasetError) as info:
        read_coco(path)
    one_line_error(info, path, problem)
    dataset, report = read_coco(path, on_error="skip")
    assert [r.image_id for r in dataset.records] == [2]
    logged(report, "skipped", 1, str(path))


# (changes, boxes after loading, report kind, count)
COCO_FIXES = {
    "partly outside": ({"bbox": [10, 2, 30, 5]}, [[10, 2, 20, 7]], "box_clipped", 1),
    "negative coordinates": ({"bbox": [-2, -3, 5, 5]}, [[0, 0, 3, 2]], "box_clipped", 1),
    "entirely outside": ({"bbox": [25, 2, 3, 3]}, [], "box_outside_dropped", 1),
    "zero area": ({"bbox": [2, 2, 0, 5]}, [], "box_zero_area_dropped", 1),
    "negative width": ({"bbox": [10, 2, -5, 5]}, [], "box_inverted_dropped", 1),
    "size 0x0": ({"width": 0, "height": 0}, [[2, 2, 10, 10]], "size_zero_fixed", 1),
    "no size": ({"width": None, "height": None}, [[2, 2, 10, 10]], "size_missing_fixed", 1),
    "no objects": ({"image_id": 2}, [], "image_without_objects", 1),
}


@pytest.mark.parametrize("case", list(COCO_FIXES))
def test_coco_defects_are_fixed_with_a_logged_count(tmp_path: Path, case: str) -> None:
    changes, boxes, kind, count = COCO_FIXES[case]
    data = coco(tmp_path, **changes)
    if case == "no objects":  # the annotation belongs to another image
        data = with_second_image(data, tmp_path)
        data["annotations"] = data["annotations"][1:]
    path = write(tmp_path / "gt.json", json.dumps(data))
    dataset, report = read_coco(path)
    record = dataset.records[0]
    assert (record.image_id, record.width, record.height) == (1, 20, 16)
    np.testing.assert_array_equal(record.boxes, np.asarray(boxes, np.float32).reshape(-1, 4))
    logged(report, kind, count, "gt.json")


# --- detections given to eval_det --------------------------------------------------------------------

GOOD = {"image_id": 1, "category_id": 1, "bbox": [2, 2, 8, 8], "score": 0.9}
DETECTION_ERRORS = {
    "unknown category id": ({"category_id": 3}, r"unknown category id\(s\) \[3\]"),
    "NaN score": ({"score": float("nan")}, "scores must be finite"),
    "score as text": ({"score": "high"}, "malformed COCO results entry"),
    "NaN coordinate": ({"bbox": [2, 2, float("nan"), 8]}, "box coordinates .* must be finite"),
    "negative width": (
        {"bbox": [2, 2, -3, 8]},
        r"entry 1: bbox \[2, 2, -3, 8\] has a negative width or height",
    ),
    "negative height": ({"bbox": [2, 2, 3, -8]}, "entry 1: .*negative width or height"),
    "bbox of 8 numbers": ({"bbox": [2, 2, 3, 3, 4, 4, 5, 5]}, r"entry 1: bbox is not 4 numbers"),
    "missing score": ({"score": None}, "malformed COCO results entry"),
}


@pytest.mark.parametrize("case", list(DETECTION_ERRORS))
def test_bad_detections_are_one_line_error(tmp_path: Path, case: str) -> None:
    changes, problem = DETECTION_ERRORS[case]
    bad = {key: value for key, value in {**GOOD, **changes}.items() if value is not None}
    source = tmp_path / "dets.json"
    with pytest.raises(DatasetError) as info:
        detections_from_coco_results([GOOD, bad], [1], source)
    one_line_error(info, source, problem)


def test_zero_width_detection_is_scored_not_rejected() -> None:
    dets = detections_from_coco_results([{**GOOD, "bbox": [2, 2, 0, 8]}], [1])
    np.testing.assert_array_equal(dets.boxes, [[2, 2, 2, 10]])  # it overlaps nothing: a false positive


def test_detections_path_that_is_a_directory(tmp_path: Path) -> None:
    with pytest.raises(DatasetError) as info:
        load_json(tmp_path)
    one_line_error(info, tmp_path, "cannot read")


# --- the tools: exit code 2 and one line, or the skip logged -----------------------------------------

eval_det = load_tool("eval_det")
convert_dataset = load_tool("convert_dataset")


def run(module, argv: list[str]) -> int:
    return run_tool(module.main, module.get_args_parser().parse_args(argv))


def assert_one_error_line(stderr: str, problem: str) -> None:
    lines = stderr.strip().splitlines()
    assert "Traceback" not in stderr and [line for line in lines if line.startswith("error: ")] == lines[-1:]
    assert re.search(problem, lines[-1]), lines[-1]


@pytest.mark.parametrize(
    ("gt_text", "dets", "problem"),
    [
        ("{broken", [GOOD], r"gt.json: malformed JSON"),
        (None, [{**GOOD, "score": float("nan")}], "dets.json: box coordinates and scores must be finite"),
        (None, [{**GOOD, "bbox": [2, 2, -3, 8]}], "dets.json: entry 0: .*negative width"),
        (None, [{**GOOD, "image_id": 9}], "dets.json: image id 9 is not in the ground truth"),
    ],
)
def test_eval_det_exits_2_with_one_line(tmp_path: Path, capsys, gt_text, dets, problem: str) -> None:
    gt = write(tmp_path / "gt.json", gt_text if gt_text is not None else json.dumps(coco(tmp_path)))
    path = write(tmp_path / "dets.json", json.dumps(dets))
    argv = ["--gt", str(gt), "--dets", str(path), "--out", str(tmp_path / "e"), "--no-plots"]
    assert run(eval_det, argv) == 2
    assert_one_error_line(capsys.readouterr().err, problem)


def test_convert_dataset_bad_xml_exits_2_and_skip_errors_logs_the_file(tmp_path: Path, capsys) -> None:
    image(tmp_path / "set" / "ok.jpg")
    write(tmp_path / "set" / "ok.xml", xml(obj()))
    image(tmp_path / "set" / "bad.jpg")
    bad = write(tmp_path / "set" / "bad.xml", xml(size="<size><width>nan</width><height>1</height></size>"))
    argv = [str(tmp_path / "set"), "--out", str(tmp_path / "out.json")]
    assert run(convert_dataset, argv) == 2
    assert_one_error_line(capsys.readouterr().err, f"{re.escape(str(bad))}: malformed XML: <width>")
    assert run(convert_dataset, [*argv, "--skip-errors"]) == 0
    err = capsys.readouterr().err
    assert f"files skipped on error: 1 ({bad}: malformed XML" in err
    assert len(json.loads((tmp_path / "out.json").read_text())["images"]) == 1


def test_eval_det_script_nan_score_no_traceback(tmp_path: Path) -> None:
    gt = write(tmp_path / "gt.json", json.dumps(coco(tmp_path)))
    dets = write(tmp_path / "dets.json", json.dumps([{**GOOD, "score": float("nan")}]))
    command = [sys.executable, "tools/eval_det.py", "--gt", str(gt), "--dets", str(dets)]
    command += ["--out", str(tmp_path / "e"), "--no-plots"]
    done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert_one_error_line(done.stderr, "dets.json: box coordinates and scores must be finite")
