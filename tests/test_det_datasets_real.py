"""The real sets in $SHARED_DATA load without error, with exactly the repairs they need."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
from conftest import shared_data_dir

from backbone.image_io import read_image_rgb
from detect.datasets import open_detection_dataset, read_name_list


def box_counts(dataset) -> dict[str, int]:
    labels = Counter(int(label) for r in dataset.records for label in r.labels)
    return {name: labels[i] for i, name in enumerate(dataset.class_names)}


def assert_sane(dataset) -> None:
    for record in dataset.records:
        assert record.boxes.dtype == np.float32 and record.labels.dtype == np.int64
        assert (record.boxes[:, 2] > record.boxes[:, 0]).all() and (
            record.boxes[:, 3] > record.boxes[:, 1]
        ).all()
        assert (record.boxes >= 0).all()
        assert (record.boxes[:, [0, 2]] <= record.width).all() and (
            record.boxes[:, [1, 3]] <= record.height
        ).all()
    assert len({r.image_id for r in dataset.records}) == len(dataset.records)


def test_fruit_train_and_test() -> None:
    root = shared_data_dir("fruit")
    train, train_report = open_detection_dataset(root / "train")
    test, test_report = open_detection_dataset(root / "test")
    assert len(train.records) == 240 and len(test.records) == 60
    assert train.class_names == test.class_names == ["apple", "banana", "orange"]
    assert box_counts(train) == {"apple": 156, "banana": 169, "orange": 140}
    assert box_counts(test) == {"apple": 35, "banana": 40, "orange": 42}
    assert_sane(train)
    assert_sane(test)
    # What the loader fixed: 0x0 <size> fields (those files are PNGs behind .jpg names, 26 of them
    # RGBA or palette); no box needed clipping or dropping.
    assert train_report.counts() == {  # apple_62.jpg's 2,400 zero bytes after its end marker are padding
        "size_zero_fixed": 33,
        "content_not_extension": 33,
        "content_not_rgb": 26,
    }
    assert test_report.counts() == {"size_zero_fixed": 4, "content_not_extension": 4, "content_not_rgb": 3}
    assert "apple_1.xml" in {Path(f).name for f in train_report.files("size_zero_fixed")}


def test_fruit_sizes_are_the_decoded_sizes_for_the_odd_files() -> None:
    dataset, report = open_detection_dataset(shared_data_dir("fruit") / "test")
    odd = set(report.files("content_not_extension")) | set(report.files("content_not_rgb"))
    checked = 0
    for record in dataset.records:
        if record.file_name in odd:
            assert read_image_rgb(record.file_name).shape == (record.height, record.width, 3)
            checked += 1
    assert checked == 4


def test_raccoon_all_and_csv_splits() -> None:
    root = shared_data_dir("raccoon")
    full, report = open_detection_dataset(root)
    assert len(full.records) == 200 and box_counts(full) == {"raccoon": 217}
    assert_sane(full)
    assert report.counts() == {"content_not_rgb": 3}  # three grayscale JPEGs; nothing else to fix
    train, train_report = open_detection_dataset(root, names_file=root / "data" / "train_labels.csv")
    test, _ = open_detection_dataset(root, names_file=root / "data" / "test_labels.csv")
    assert (len(train.records), len(test.records)) == (160, 40)
    assert (box_counts(train)["raccoon"], box_counts(test)["raccoon"]) == (173, 44)
    assert not {r.file_name for r in train.records} & {r.file_name for r in test.records}
    assert train_report.count("skipped") == 0
    assert len(read_name_list(root / "data" / "train_labels.csv")) == 160
