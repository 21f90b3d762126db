"""Classification data sets: layouts, label files, splits, duplicates, robust decoding, the cache."""

from __future__ import annotations

import logging
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from conftest import shared_data_dir
from PIL import Image
from torch.utils.data import DataLoader

from backbone.data import (
    CorruptImageError,
    DatasetError,
    ImageClassificationDataset,
    build_classification_datasets,
)
from backbone.data_index import find_duplicate_groups, read_val_labels, scan_class_folders, stratified_split
from backbone.synthetic import SHAPE_CLASSES


def _pixels(height: int, width: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def _write(path: Path, image: np.ndarray, ext: str = ".jpg") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    ok, data = cv2.imencode(ext, image)
    assert ok
    path.write_bytes(data.tobytes())
    return path


def make_dirty_tree(root: Path) -> dict[str, Path]:
    """Two classes holding every awkward kind of file a real data set has."""
    files = {
        "png_as_jpg": _write(root / "a" / "png_as_jpg.jpg", _pixels(20, 30, 1), ".png"),
        "rgba": _write(
            root / "a" / "rgba.png", np.dstack([_pixels(21, 30, 2), np.full((21, 30), 128, np.uint8)]), ".png"
        ),
        "gray": _write(root / "a" / "sub" / "gray.jpg", _pixels(22, 30, 3)[:, :, 0]),
        "truncated": root / "b" / "b1_truncated.jpg",
        "empty": root / "b" / "b2_empty.jpg",
        "plain": _write(root / "b" / "b3_plain.JPEG", _pixels(25, 30, 6)),
    }
    Image.fromarray(_pixels(23, 30, 4)).convert("P").save(root / "a" / "palette.png")
    Image.new("CMYK", (30, 24), (10, 200, 30, 0)).save(root / "b" / "b0_cmyk.jpg")
    files["palette"], files["cmyk"] = root / "a" / "palette.png", root / "b" / "b0_cmyk.jpg"
    whole = cv2.imencode(".jpg", _pixels(26, 30, 5))[1].tobytes()
    files["truncated"].write_bytes(whole[: len(whole) // 2])
    files["empty"].write_bytes(b"")
    (root / "b" / "notes.txt").write_text("not an image")
    return files


def test_every_format_decodes_and_bad_files_are_replaced_and_logged(tmp_path, caplog):
    files = make_dirty_tree(tmp_path)
    samples, class_names = scan_class_folders(tmp_path)
    assert class_names == ["a", "b"] and len(samples) == 8  # notes.txt ignored, sub/ found
    dataset = ImageClassificationDataset(samples, class_names)
    heights = {}
    with caplog.at_level(logging.WARNING):
        for index, (path, _) in enumerate(samples):
            image, label = dataset[index]
            assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
            heights[Path(path).name] = image.shape[0]
    assert heights["png_as_jpg.jpg"] == 20 and heights["palette.png"] == 23 and heights["b0_cmyk.jpg"] == 24
    # The truncated JPEG decodes as far as its data goes (its own 26 rows, the rest grey); the empty
    # file is replaced by the next decodable sample (b3_plain).
    assert heights["b1_truncated.jpg"] == 26 and heights["b2_empty.jpg"] == 25
    assert set(dataset.skipped) == {str(files["empty"])}
    assert set(dataset.bad_images.files("partial")) == {str(files["truncated"])}
    assert str(files["empty"]) in caplog.text and "1 so far" in caplog.text
    rgba = dataset[[Path(p).name for p, _ in samples].index("rgba.png")][0]
    assert rgba.shape == (21, 30, 3)


def test_strict_mode_raises_one_line_naming_the_file_also_from_a_worker(tmp_path):
    files = make_dirty_tree(tmp_path)
    samples, class_names = scan_class_folders(tmp_path)
    dataset = ImageClassificationDataset(samples, class_names, on_bad_image="error")
    empty_index = [Path(p) for p, _ in samples].index(files["empty"])
    with pytest.raises(CorruptImageError) as info:
        dataset[empty_index]
    assert str(info.value) == f"{files['empty']}: file is empty (zero bytes)"
    batches = iter(DataLoader(torch.utils.data.Subset(dataset, [empty_index]), batch_size=1, num_workers=1))
    with pytest.raises(CorruptImageError) as info:
        next(batches)
    assert str(info.value) == f"{files['empty']}: file is empty (zero bytes)"  # not torch's wrapper
    del batches, info  # stop the worker now rather than at garbage collection


def test_cache_drops_bad_files_up_front_and_serves_reduced_images(tmp_path, caplog):
    make_dirty_tree(tmp_path / "data")
    big = _write(tmp_path / "data" / "a" / "zz_big.png", _pixels(200, 300, 9), ".png")
    with caplog.at_level(logging.INFO):
        train, val, names = build_classification_datasets(
            tmp_path / "data", 16, val_fraction=0.3, cache=True, train_transform=None, val_transform=None
        )
    assert len(train) + len(val) == 8  # 9 files, the empty one dropped (the truncated one decodes in part)
    assert "1 image skipped: " in caplog.text and "b2_empty.jpg (file is empty" in caplog.text
    paths = [p for p, _ in train.samples + val.samples]
    assert not any("empty" in p for p in paths) and any("truncated" in p for p in paths)
    dataset = train if str(big) in [p for p, _ in train.samples] else val
    image = dataset.load_image([p for p, _ in dataset.samples].index(str(big)))
    assert image.shape == (18, 27, 3)  # shorter side cut to round(16 x 1.15) = 18, never upscaled
    with pytest.raises(CorruptImageError, match=r"b1_truncated.jpg: truncated JPEG"):
        build_classification_datasets(
            tmp_path / "data", 16, val_fraction=0.3, cache=True, on_bad_image="error"
        )


def test_stratified_split_is_deterministic_per_class_and_complete():
    labels = [0] * 10 + [1] * 5 + [2] * 2 + [3]
    train, val = stratified_split(labels, 0.2, seed=0)
    assert sorted(train + val) == list(range(len(labels)))
    assert [sum(labels[i] == c for i in val) for c in range(4)] == [2, 1, 1, 0]
    assert (train, val) == stratified_split(labels, 0.2, seed=0)
    assert stratified_split(labels, 0.2, seed=1)[1] != val


def test_class_folder_split_and_transforms(tmp_path):
    for c in range(3):
        for i in range(10):
            _write(tmp_path / f"class{c}" / f"{i}.png", _pixels(40, 48, 10 * c + i), ".png")
    train, val, names = build_classification_datasets(tmp_path, 32, val_fraction=0.2, seed=5)
    assert names == ["class0", "class1", "class2"] and (len(train), len(val)) == (24, 6)
    assert sorted(val.targets) == [0, 0, 1, 1, 2, 2]
    image, label = train[0]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32
    assert torch.equal(train[0][0], image)
    train.set_epoch(1)
    assert not torch.equal(train[0][0], image)  # augmentation changes with the epoch
    assert torch.equal(val[0][0], val[0][0])
    other, _, _ = build_classification_datasets(tmp_path, 32, val_fraction=0.2, seed=5, augment_seed=6)
    assert other.samples == train.samples and not torch.equal(other[0][0], image)  # same split, new draws
    milder, _, _ = build_classification_datasets(tmp_path, 32, seed=5, train_scale=(0.5, 1.0))
    assert {t.scale for t in milder.transform.compose.transforms[0].transforms} == {(0.5, 1.0)}
    with pytest.raises(DatasetError, match="train/ and val/"):
        build_classification_datasets(tmp_path, 32, split="folders")
    with pytest.raises(DatasetError, match="not found"):
        build_classification_datasets(tmp_path / "missing", 32)


def test_train_val_class_folders(tmp_path):
    for k, name in enumerate(("cat", "dog", "eel")):
        for i in range(3):
            _write(tmp_path / "train" / name / f"{name}{i}.png", _pixels(12, 12, 10 * k + i), ".png")
    _write(tmp_path / "val" / "eel" / "v.png", _pixels(12, 12, 77), ".png")  # val may lack classes
    train, val, names = build_classification_datasets(tmp_path, 8)
    assert names == ["cat", "dog", "eel"] and len(train) == 9 and val.samples[0][1] == 2
    _write(tmp_path / "val" / "fox" / "f.png", _pixels(12, 12, 78), ".png")
    with pytest.raises(DatasetError, match="fox"):
        build_classification_datasets(tmp_path, 8)


def test_ilsvrc_cls_loc_layout_with_kaggle_solution_csv(tmp_path, caplog):
    root = tmp_path / "ILSVRC" / "Data" / "CLS-LOC"
    for synset in ("n01440764", "n01443537"):
        _write(root / "train" / synset / f"{synset}_1.JPEG", _pixels(10, 10, int(synset[-2:])))
    for i in range(1, 4):
        _write(root / "val" / f"ILSVRC2012_val_0000000{i}.JPEG", _pixels(10, 10, 50 + i))
    (tmp_path / "LOC_val_solution.csv").write_text(
        "ImageId,PredictionString\n"
        "ILSVRC2012_val_00000001,n01443537 1 2 8 9 n01443537 0 0 5 5\n"
        "ILSVRC2012_val_00000002,n01440764 1 2 8 9\n"
        "ILSVRC2012_val_00000009,n01440764 1 2 8 9\n"  # no such image: counted
    )
    with caplog.at_level(logging.WARNING):
        train, val, names = build_classification_datasets(root, 8, dedupe=False)
    assert names == ["n01440764", "n01443537"] and len(train) == 2
    assert [(Path(p).name, label) for p, label in val.samples] == [
        ("ILSVRC2012_val_00000001.JPEG", 1),
        ("ILSVRC2012_val_00000002.JPEG", 0),
    ]
    assert "1 labelled images are not in" in caplog.text and "1 images have no label" in caplog.text


def test_filename_label_text_file(tmp_path):
    val_dir = tmp_path / "val"
    for name in ("x.png", "y.png"):
        _write(val_dir / name, _pixels(8, 8, len(name)), ".png")
    labels = tmp_path / "labels.txt"
    labels.write_text("# name label\nx.png dog\ny 0\n")
    assert [(Path(p).name, c) for p, c in read_val_labels(labels, val_dir, ["cat", "dog"])] == [
        ("x.png", 1),
        ("y.png", 0),
    ]
    labels.write_text("x.png wolf\n")
    with pytest.raises(DatasetError, match=r"labels.txt:1: unknown class 'wolf'"):
        read_val_labels(labels, val_dir, ["cat", "dog"])
    labels.write_text("x.png\n")
    with pytest.raises(DatasetError, match=r"labels.txt:1: expected 'filename label'"):
        read_val_labels(labels, val_dir, ["cat", "dog"])


def test_identical_files_are_deduplicated_and_reported(tmp_path, caplog):
    shared, repeated = _pixels(10, 10, 1), _pixels(10, 10, 2)
    _write(tmp_path / "train" / "a" / "same.png", shared, ".png")
    _write(tmp_path / "train" / "b" / "same.png", shared, ".png")  # one file under two labels
    _write(tmp_path / "train" / "a" / "r1.png", repeated, ".png")
    _write(tmp_path / "train" / "a" / "r2.png", repeated, ".png")  # repeated under one label
    _write(tmp_path / "train" / "b" / "leak.png", _pixels(10, 10, 3), ".png")
    _write(tmp_path / "train" / "b" / "ok.png", _pixels(10, 10, 4), ".png")
    _write(tmp_path / "val" / "b" / "leak_copy.png", _pixels(10, 10, 3), ".png")  # also in train
    with caplog.at_level(logging.WARNING):
        train, val, _ = build_classification_datasets(tmp_path, 8)
    assert sorted(Path(p).name for p, _ in train.samples) == ["ok.png", "r1.png"]
    assert [Path(p).name for p, _ in val.samples] == ["leak_copy.png"]
    assert "dropped 2 files listed under two labels and 2 repeated copies" in caplog.text
    assert str(tmp_path / "train" / "b" / "same.png") in caplog.text


def test_duplicate_groups_need_identical_bytes_not_just_size_and_header(tmp_path):
    head = bytes(range(256)) * 40  # 10,240 bytes: longer than the 8 KB header hash
    contents = {"a": head + b"x", "b": head + b"y", "c": head + b"x", "d": b"short", "e": b"other"}
    paths = []
    for name, data in contents.items():
        (tmp_path / name).write_bytes(data)
        paths.append(str(tmp_path / name))
    assert find_duplicate_groups(paths + [str(tmp_path / "missing")]) == [[0, 2]]


def test_synthetic_default_when_no_root():
    train, val, names = build_classification_datasets(None, 32, synthetic_train_size=16, synthetic_val_size=8)
    assert names == list(SHAPE_CLASSES) and (len(train), len(val)) == (16, 8)
    image, label = val[3]
    assert image.shape == (3, 32, 32) and label == (16 + 3) % len(SHAPE_CLASSES)


def test_flowers_split_counts_and_determinism(caplog):
    root = shared_data_dir("flowers")
    with caplog.at_level(logging.WARNING):
        train, val, names = build_classification_datasets(root, 128, val_fraction=0.2, seed=0)
    assert names == ["daisy", "dandelion", "rose", "sunflower", "tulip"]
    # 4,317 files; 4 files listed under both rose and tulip (8 dropped), 2 repeated sunflowers.
    assert "dropped 8 files listed under two labels and 2 repeated copies" in caplog.text
    assert (len(train), len(val)) == (3446, 861)
    assert np.bincount(val.targets).tolist() == [153, 210, 156, 146, 196]
    assert not {p for p, _ in train.samples} & {p for p, _ in val.samples}
    again_train, again_val, _ = build_classification_datasets(root, 128, val_fraction=0.2, seed=0)
    assert again_val.samples == val.samples and again_train.samples == train.samples
    _, other_val, _ = build_classification_datasets(root, 128, val_fraction=0.2, seed=1)
    assert len(other_val) == 861 and other_val.samples != val.samples
    image, _ = val[0]
    assert image.shape == (3, 128, 128)


def test_an_empty_split_is_a_one_line_error_naming_the_folder(tmp_path):
    for name in ("a", "b"):  # the same bytes under both labels: both dropped, nothing left
        _write(tmp_path / name / "same.png", _pixels(8, 8, 0), ".png")
    with pytest.raises(DatasetError, match=rf"^{tmp_path}: no training images left"):
        build_classification_datasets(tmp_path, 8)
