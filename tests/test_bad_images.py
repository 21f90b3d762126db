"""The bad-image corpus (issue 15): every case ends fixed with a count, skipped with a count and its
name, or a one-line error naming the file, under the one policy ``on_bad_image``
(backbone/bad_images.py), in the decoder, the data sets, the proposal cache and the tools."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml
from PIL import Image
from tool_loader import load_tool

from backbone import image_io
from backbone.bad_images import BadImageError, BadImages
from backbone.data import DatasetError, ImageClassificationDataset, build_classification_datasets
from backbone.image_io import decode_image
from backbone.runtime.errors import UserError
from backbone.runtime.log import run_tool
from detect.datasets import read_xml_folder
from detect.proposals import methods as proposal_methods
from detect.proposals.cache import bad_image_events, build_cache, load_cache
from detect.proposals.methods import SelectiveSearchMethod
from detect.proposals.selective_search import ss_settings
from detect.rcnn.data import ImageSource

REPO = Path(__file__).resolve().parents[1]
SKIPPED = {"empty.jpg", "huge.png", "dir.jpg", "truncated_png.png"}  # what the decoders skip
CONVERTED = {"png_as.jpg", "rgba.png", "palette.png", "gray.jpg", "gray16.png", "cmyk.jpg"}


def smooth(height: int, width: int, seed: int) -> np.ndarray:
    """Blocks of colour (compress well, segment into a few regions), uint8 RGB."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (4, 5, 3), dtype=np.uint8)
    return cv2.resize(small, (width, height), interpolation=cv2.INTER_NEAREST)


def encode(image: np.ndarray, ext: str) -> bytes:
    ok, data = cv2.imencode(ext, image[:, :, ::-1] if image.ndim == 3 and image.shape[2] == 3 else image)
    assert ok
    return data.tobytes()


def png_claiming(width: int, height: int) -> bytes:
    """A 100-byte PNG whose header claims ``width x height``: its pixels are never allocated."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0" * 16))
        + chunk(b"IEND", b"")
    )


def pil_bytes(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


def make_corpus(directory: Path) -> dict[str, Path]:
    """The issue's bad-input images (the symlink aside: ``test_symlink_*``), 48 x 64 with pixels."""
    directory.mkdir(parents=True, exist_ok=True)
    jpeg = encode(smooth(48, 64, 1), ".jpg")
    png = encode(smooth(48, 64, 2), ".png")
    rgba = np.dstack([smooth(48, 64, 3)[:, :, ::-1], np.full((48, 64), 128, np.uint8)])  # BGRA for cv2
    files = {
        "good.jpg": jpeg,
        "truncated.jpg": jpeg[: len(jpeg) * 6 // 10],
        "truncated_png.png": png[: len(png) // 2],
        "empty.jpg": b"",
        "png_as.jpg": png,
        "rgba.png": encode(rgba, ".png"),
        "palette.png": pil_bytes(Image.fromarray(smooth(48, 64, 4)).convert("P"), "PNG"),
        "gray.jpg": encode(smooth(48, 64, 5)[:, :, 0], ".jpg"),
        "gray16.png": encode(np.full((48, 64), 65535 // 3, np.uint16), ".png"),
        "cmyk.jpg": pil_bytes(Image.new("CMYK", (64, 48), (10, 200, 30, 0)), "JPEG"),
        "tiny.png": encode(np.full((1, 1, 3), 200, np.uint8), ".png"),
        "huge.png": png_claiming(20000, 20000),
    }
    paths = {}
    for name, data in files.items():
        (directory / name).write_bytes(data)
        paths[name] = directory / name
    (directory / "dir.jpg").mkdir()
    paths["dir.jpg"] = directory / "dir.jpg"
    return paths


def write_xml(path: Path, filename: str, width: int = 64, height: int = 48) -> None:
    path.write_text(
        f"<annotation><filename>{filename}</filename><size><width>{width}</width><height>{height}</height>"
        "<depth>3</depth></size><object><name>thing</name><difficult>0</difficult><bndbox><xmin>5</xmin>"
        "<ymin>5</ymin><xmax>40</xmax><ymax>30</ymax></bndbox></object></annotation>"
    )


def make_folder_dataset(directory: Path) -> dict[str, Path]:
    """The corpus as an image + XML folder data set (each image with a one-box XML beside it)."""
    corpus = make_corpus(directory)
    for name in corpus:
        write_xml(directory / f"{Path(name).stem}.xml", name)
    return corpus


# ---- the decoder and the policy ---------------------------------------------------------------


def test_every_corpus_case_decodes_or_is_skipped_by_name(tmp_path: Path, caplog) -> None:
    corpus = make_corpus(tmp_path)
    bad = BadImages("skip", "corpus")
    with caplog.at_level(logging.WARNING):
        images = {name: bad.read(path) for name, path in corpus.items()}
    assert {name for name, image in images.items() if image is None} == SKIPPED
    for name, image in images.items():
        if image is not None:
            expected = (1, 1, 3) if name == "tiny.png" else (48, 64, 3)
            assert image.shape == expected and image.dtype == np.uint8, name
    skipped = {Path(p).name: problem for p, problem in bad.files("skipped").items()}
    assert skipped["empty.jpg"] == "file is empty (zero bytes)"
    assert skipped["dir.jpg"] == "is a directory, not an image file"
    assert skipped["truncated_png.png"].startswith("truncated PNG")
    assert "20000 x 20000 = 400,000,000 pixels, above the limit of 100,000,000" in skipped["huge.png"]
    # The truncated JPEG: its first rows as encoded, the missing end filled (cv2.imread's behaviour).
    assert [Path(p).name for p in bad.files("partial")] == ["truncated.jpg"]
    whole = images["good.jpg"].astype(int)
    assert np.abs(images["truncated.jpg"][:8].astype(int) - whole[:8]).mean() < 2
    converted = {Path(p).name: note for p, note in bad.files("converted").items()}
    assert set(converted) == CONVERTED
    assert converted["png_as.jpg"] == "PNG content behind .jpg"
    assert converted["cmyk.jpg"] == "CMYK converted to RGB"
    assert converted["gray16.png"] == "16-bit grayscale scaled to 8 bits"
    assert images["gray16.png"][0, 0, 0] == round((65535 // 3) / 257)
    assert np.array_equal(
        images["rgba.png"][0, 0], ((smooth(48, 64, 3)[0, 0].astype(int) * 128 + 255 * 127 + 127) // 255)
    )
    # Each skipped or partial file was logged once when met, then one summary per kind.
    assert (
        caplog.text.count("corpus: skipped ") == 4
        and "empty.jpg (file is empty (zero bytes)); " in caplog.text
    )
    lines = bad.summary_lines()
    assert (
        lines[0].startswith("corpus: 4 images skipped: ")
        and "dir.jpg (is a directory, not an image file)" in lines[0]
    )
    assert (
        lines[1].startswith("corpus: 1 image decoded partially: ")
        and "truncated.jpg (truncated JPEG" in lines[1]
    )
    assert lines[2].startswith("corpus: 6 images converted to RGB: ") and lines[2].endswith(", and 1 more")


def test_error_policy_stops_on_each_bad_file_with_one_line(tmp_path: Path) -> None:
    corpus = make_corpus(tmp_path)
    for name in [*SKIPPED, "truncated.jpg"]:
        with pytest.raises(BadImageError) as info:
            BadImages("error").read(corpus[name])
        assert str(info.value).startswith(f"{corpus[name]}: ") and "\n" not in str(info.value)
    with pytest.raises(BadImageError, match=r"truncated.jpg: truncated JPEG \(the data ends before"):
        BadImages("error").read(corpus["truncated.jpg"])
    for name in CONVERTED | {"good.jpg", "tiny.png"}:  # conversions are never errors
        assert BadImages("error").read(corpus[name]) is not None
    with pytest.raises(UserError, match="on_bad_image: must be one of skip, error, got 'ignore'"):
        BadImages("ignore")


def test_the_pixel_limit_is_checked_from_the_header_before_decoding(tmp_path, monkeypatch) -> None:
    corpus = make_corpus(tmp_path)
    decoded = []
    monkeypatch.setattr(image_io.cv2, "imdecode", lambda *a: decoded.append(a) or None)
    with pytest.raises(image_io.ImageDecodeError, match="above the limit"):
        decode_image(corpus["huge.png"])
    assert decoded == []  # refused from its 100-byte header: nothing was decoded or allocated
    monkeypatch.undo()
    monkeypatch.setattr(image_io, "MAX_IMAGE_PIXELS", 48 * 64 - 1)  # the limit is one named constant
    with pytest.raises(
        image_io.ImageDecodeError,
        match=r"good.jpg: image is 64 x 48 = 3,072 pixels, above the limit of 3,071",
    ):
        decode_image(corpus["good.jpg"])


def test_a_device_is_never_read(tmp_path: Path) -> None:
    if not os.path.exists("/dev/zero"):
        pytest.skip("no /dev/zero")
    link = tmp_path / "zero.jpg"
    link.symlink_to("/dev/zero")  # np.fromfile would read it forever
    assert BadImages().read(link) is None


# ---- data sets --------------------------------------------------------------------------------


def test_classification_data_skips_by_name_or_stops_in_one_line(tmp_path: Path, caplog) -> None:
    corpus = make_corpus(tmp_path / "data" / "a")
    make_corpus(tmp_path / "data" / "b")
    options = {"val_fraction": 0.3, "dedupe": False}  # the two classes hold the same bytes
    with caplog.at_level(logging.INFO):
        train, val, _ = build_classification_datasets(
            tmp_path / "data", 16, cache=True, train_transform=None, val_transform=None, **options
        )
    # 2 x 12 image files (dir.jpg is a folder, walked like any subfolder), 2 x 3 skipped by the cache.
    assert len(train) + len(val) == 2 * (12 - 3)
    counts = re.findall(r"caching images: (\d+) images? (skipped|decoded partially)", caplog.text)
    assert sum(int(n) for n, kind in counts if kind == "skipped") == 6
    assert sum(int(n) for n, kind in counts if kind != "skipped") == 2
    with pytest.raises(BadImageError, match=r"(empty.jpg|huge.png|truncated.jpg|truncated_png.png): "):
        build_classification_datasets(tmp_path / "data", 16, cache=True, on_bad_image="error", **options)
    # Decoded on access (no cache): the 1x1 image goes through the training transform too.
    samples = [(str(p), 0) for p in corpus.values() if p.is_file()]
    tiny = [Path(p).name for p, _ in samples].index("tiny.png")
    assert ImageClassificationDataset(samples, ["a"])[tiny][0].shape == (1, 1, 3)
    augmenting, _, _ = build_classification_datasets(tmp_path / "data", 16, **options)
    assert ImageClassificationDataset(samples, ["a"], augmenting.transform)[tiny][0].shape == (3, 16, 16)


def test_symlink_leaving_the_data_root_is_refused_in_one_line(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    secret = outside / "secret.jpg"
    secret.write_bytes(encode(smooth(48, 64, 9), ".jpg"))
    root = tmp_path / "data"
    make_folder_dataset(root / "images")
    (root / "images" / "link.jpg").symlink_to(secret)
    write_xml(root / "images" / "link.xml", "link.jpg")
    with pytest.raises(UserError) as info:
        read_xml_folder(root / "images")
    assert str(info.value).startswith(f"{root / 'images' / 'link.jpg'}: symlink leads outside the image root")
    assert str(secret) in str(info.value) and "\n" not in str(info.value)
    (root / "cls" / "a").mkdir(parents=True)
    (root / "cls" / "a" / "link.jpg").symlink_to(secret)
    (root / "cls" / "b").mkdir()
    (root / "cls" / "b" / "x.jpg").write_bytes(encode(smooth(48, 64, 10), ".jpg"))
    with pytest.raises(
        DatasetError, match=r"link.jpg: symlink leads outside the data root .* \(to .*secret.jpg\)"
    ):
        build_classification_datasets(root / "cls", 16)
    # A symlinked folder is followed as before (a root or class folder on another disk).
    (root / "cls" / "a" / "link.jpg").unlink()
    (root / "cls" / "b" / "y.jpg").write_bytes(encode(smooth(48, 64, 11), ".jpg"))
    (outside / "other.jpg").write_bytes(encode(smooth(48, 64, 12), ".jpg"))
    (root / "cls" / "c").symlink_to(outside, target_is_directory=True)
    train, val, names = build_classification_datasets(root / "cls", 16, val_fraction=0.5)
    assert names == ["a", "b", "c"]


def test_detection_reader_skips_bad_files_by_name_and_keeps_the_rest(tmp_path: Path) -> None:
    corpus = make_folder_dataset(tmp_path / "images")
    dataset, report = read_xml_folder(tmp_path / "images")
    kept = {Path(r.file_name).name for r in dataset.records}
    # The reader reads headers: the truncated PNG passes here and is skipped where it is decoded.
    assert kept == set(corpus) - {"empty.jpg", "huge.png", "dir.jpg"}
    skipped = "\n".join(report.files("skipped"))
    assert "empty.jpg: file is empty (zero bytes)" in skipped and "dir.jpg: is a directory" in skipped
    assert "huge.png: image is 20000 x 20000" in skipped
    assert report.files("jpeg_truncated_kept") == [str(corpus["truncated.jpg"])]
    assert report.count("content_not_extension") == 1 and report.count("content_not_rgb") == 5
    with pytest.raises(UserError, match=r"dir.jpg: is a directory, not an image file"):
        read_xml_folder(tmp_path / "images", on_bad_image="error")


def test_region_images_skip_or_stop_and_partial_decodes_count(tmp_path: Path) -> None:
    corpus = make_corpus(tmp_path)
    from detect.datasets import DetectionRecord

    records = [DetectionRecord(i + 1, str(p), 64, 48) for i, p in enumerate(corpus.values())]
    for in_memory in (False, True):
        source = ImageSource(records, 32, in_memory)
        got = {name: source(i) for i, name in enumerate(corpus)}
        assert {n for n, image in got.items() if image is None} == SKIPPED
        assert got["good.jpg"].shape == (32, 43, 3) and got["tiny.png"].shape == (1, 1, 3)
        assert source.bad_images.count("skipped") == 4 and source.bad_images.count("partial") == 1
    with pytest.raises(BadImageError):
        ImageSource(records, 32, True, on_bad_image="error")


# ---- the proposal cache: skipped images are recorded, reused, and stop an "error" run ---------


def test_proposal_cache_records_skips_so_a_resume_neither_redoes_nor_loses_them(
    tmp_path, monkeypatch
) -> None:
    corpus = make_corpus(tmp_path / "images")
    from detect.datasets import DetectionRecord

    names = ["good.jpg", "truncated_png.png", "truncated.jpg", "tiny.png"]
    records = [DetectionRecord(i + 1, str(corpus[n]), 64, 48) for i, n in enumerate(names)]
    method = SelectiveSearchMethod(ss_settings("fast", min_size=4))
    summary = build_cache(records, method, tmp_path / "cache", workers=1, shard_size=2, progress=False)
    assert sorted((k, Path(p).name) for k, p, _ in summary["bad_images"]) == [
        ("partial", "truncated.jpg"),
        ("skipped", "truncated_png.png"),
    ]
    proposals = load_cache(records, method, tmp_path / "cache")
    assert len(proposals.boxes[1]) == 0 and proposals.status[1][0] == "skipped"
    assert len(proposals.boxes[2]) > 0 and proposals.status[2][0] == "partial"
    # Resumed: every shard is reused, nothing decoded again, the skip still reported.
    monkeypatch.setattr(proposal_methods, "decode_image", lambda *a, **k: pytest.fail("decoded again"))
    again = build_cache(records, method, tmp_path / "cache", workers=1, shard_size=2, progress=False)
    assert again["computed"] == 0 and again["bad_images"] == summary["bad_images"]
    # A run under "error" stops on what the cache recorded, naming the file.
    with pytest.raises(BadImageError, match=r"(truncated_png.png|truncated.jpg): truncated"):
        BadImages("error").merge(bad_image_events(records, proposals))


# ---- tools end to end ----------------------------------------------------------------------------

propose = load_tool("propose")
convert_dataset = load_tool("convert_dataset")


def write_propose_config(tmp_path: Path, images: Path, **extra: object) -> Path:
    config = {
        "name": "corpus",
        "splits": {"test": {"path": str(images)}},
        "method": "ss",
        "ss": {"preset": "fast", "min_size": 4},
        "cache_dir": str(tmp_path / "cache"),
        "workers": 1,
        "shard_size": 4,
        **extra,
    }
    path = tmp_path / "propose.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_propose_finishes_on_the_corpus_and_names_what_it_skipped(tmp_path: Path, caplog, capsys) -> None:
    make_folder_dataset(tmp_path / "images")
    config = write_propose_config(tmp_path, tmp_path / "images")
    argv = ["--config", str(config), "--split", "test", "--no-progress"]
    with caplog.at_level(logging.INFO):
        assert run_tool(propose.main, propose.get_args_parser().parse_args(argv)) == 0
    log = caplog.text
    # The reader skipped three files by name, the proposal stage one more, recorded in the cache.
    assert "files skipped on error: 3" in log and "empty.jpg: file is empty" in log
    assert "1 image skipped: " in log and "truncated_png.png (truncated PNG" in log
    assert "1 image decoded partially: " in log and "truncated.jpg (truncated JPEG" in log
    # Under "error" the same data stops before any work, in one line naming a file (exit code 2).
    error_argv = [*argv, "--set", "on_bad_image=error"]
    assert run_tool(propose.main, propose.get_args_parser().parse_args(error_argv)) == 2
    err = capsys.readouterr().err.strip()  # the log lines of both runs, then the error line
    last = err.splitlines()[-1]
    assert last.startswith("error: ") and "dir.jpg: is a directory" in last and "Traceback" not in err


def test_propose_error_policy_from_the_command_line_has_no_traceback(tmp_path: Path) -> None:
    images = tmp_path / "images"
    make_corpus(images)
    for name in ["good.jpg", "truncated_png.png"]:
        write_xml(images / f"{Path(name).stem}.xml", name)
    config = write_propose_config(tmp_path, images, on_bad_image="error")
    result = subprocess.run(
        [sys.executable, "tools/propose.py", "--config", str(config), "--split", "test", "--no-progress"],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=300,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert f"error: {images / 'truncated_png.png'}: truncated PNG" in result.stderr


def test_convert_dataset_writes_the_decodable_images_and_names_the_rest(
    tmp_path: Path, capsys, caplog
) -> None:
    make_folder_dataset(tmp_path / "images")
    out = tmp_path / "out.json"
    argv = [str(tmp_path / "images"), "--out", str(out)]
    with caplog.at_level(logging.INFO):
        assert run_tool(convert_dataset.main, convert_dataset.get_args_parser().parse_args(argv)) == 0
    written = {Path(image["file_name"]).name for image in json.loads(out.read_text())["images"]}
    assert "truncated.jpg" in written and not written & {"empty.jpg", "huge.png", "dir.jpg"}
    assert "JPEGs without their end marker (truncated?) kept" in caplog.text
    argv += ["--on-bad-image", "error"]
    assert run_tool(convert_dataset.main, convert_dataset.get_args_parser().parse_args(argv)) == 2
    assert "dir.jpg: is a directory, not an image file" in capsys.readouterr().err


def test_zero_padding_after_the_end_marker_is_not_truncation(tmp_path: Path) -> None:
    # fruit/train/apple_62.jpg: its end marker, then 2,400 zero bytes up to a whole 4 KB block.
    whole = encode(smooth(48, 64, 13), ".jpg")
    padded, cut = tmp_path / "padded.jpg", tmp_path / "cut.jpg"
    padded.write_bytes(whole + bytes(70_000))
    cut.write_bytes(whole[: len(whole) // 2] + bytes(70_000))
    assert not image_io.looks_truncated_jpeg(padded.read_bytes())
    assert image_io.looks_truncated_jpeg(cut.read_bytes())
    assert decode_image(padded).partial == "" and decode_image(cut).partial.startswith("truncated JPEG")
    for name in ("padded", "cut"):
        write_xml(tmp_path / f"{name}.xml", f"{name}.jpg")
    _, report = read_xml_folder(tmp_path)
    assert report.files("jpeg_truncated_kept") == [str(cut)]
