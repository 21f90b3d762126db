"""Faults (issue 15): kill -9 at random moments during train_cls, train_multibox, train_det and
propose, resume until done, and check after every kill that each file the tool wrote loads, and at
the end that the result equals an uninterrupted run's.

Kill delays are drawn uniformly within an uninterrupted run's measured duration, from a seed this
prints ("fault seed N"); ``FAULT_SEED=N`` replays the draws (the delays scale with the durations
measured, and where they land depends on the machine's speed). Each attempt is a process forked
from a server that has imported torch once: a fresh interpreter would spend most of a tiny run
importing, and a kill there tests nothing.

    FAULT_SEED=N python -m pytest -s tests/test_faults.py"""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from test_proposals_cache import make_multibox_file
from tool_loader import load_tool
from tqdm import tqdm

from backbone.runtime.log import read_metrics, run_tool
from detect.datasets.synthetic import write_synthetic_detection_split

REPO = Path(__file__).resolve().parents[1]
SEED = int(os.environ.get("FAULT_SEED", random.SystemRandom().randrange(2**31)))
KILLS = 5  # per tool
TIMING_KEYS = ("images_per_s", "seconds", "data_wait_fraction")  # differ between any two runs

SERVER = multiprocessing.get_context("forkserver")
# Third-party modules only: each run imports the project's own afresh, as the tree is then.
SERVER.set_forkserver_preload(
    ["__main__", "torch", "torchvision", "cv2", "matplotlib.pyplot", "albumentations", "pycocotools.coco",
     "pycocotools.cocoeval", "scipy.cluster.vq", "scipy.optimize", "PIL.Image", "yaml"]
)  # fmt: skip


def tool_process(tool: str, argv: list[str], log: str) -> None:
    """The tool as its command line runs it, in a forked child, its output appended to ``log``."""
    os.setsid()  # its own process group: the kill takes proposal workers with it
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.chdir(REPO)
    tqdm.set_lock(threading.RLock())  # not the default named semaphore, which a killed process leaks
    module = load_tool(tool)
    sys.exit(run_tool(module.main, module.get_args_parser().parse_args(argv)))


def run_attempt(
    tool: str,
    argv: list[str],
    log: Path,
    kill_after: float | None = None,
    kill_when: Callable[[], bool] | None = None,
) -> str:
    """Run once; SIGKILL its process group after ``kill_after`` seconds or as soon as ``kill_when()``
    holds, unless it ended first. Returns "killed" or "done"."""
    process = SERVER.Process(target=tool_process, args=(tool, argv, str(log)))
    process.start()
    deadline = time.perf_counter() + (kill_after if kill_after is not None else 300)
    while process.exitcode is None and time.perf_counter() < deadline:
        if kill_when is not None and kill_when():
            break
        process.join(0.005 if kill_when is not None else deadline - time.perf_counter())
    if process.exitcode is None:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:  # killed before setsid: no workers yet
            process.kill()
        process.join()
    if process.exitcode == -signal.SIGKILL and (kill_after is not None or kill_when is not None):
        return "killed"
    assert process.exitcode == 0, (
        f"{tool} exit {process.exitcode} (fault seed {SEED}): {log.read_text()[-3000:]}"
    )
    return "done"


def assert_every_file_loads(directory: Path, context: str) -> None:
    """Each checkpoint, model, cache, metrics, config, results or curves file there reads whole."""
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        if ".tmp" in path.name:  # a write in progress, renamed into place only when complete
            continue
        try:
            if path.suffix == ".pt":
                assert isinstance(torch.load(path, map_location="cpu", weights_only=True), dict)
            elif path.suffix == ".json":
                json.loads(path.read_text())
            elif path.suffix == ".jsonl":
                for line in path.read_text().splitlines():
                    json.loads(line)
            elif path.suffix == ".npz":
                with np.load(path, allow_pickle=False) as arrays:
                    for key in arrays.files:
                        arrays[key]
            elif path.suffix == ".yaml":
                assert isinstance(yaml.safe_load(path.read_text()), dict)  # not empty
            elif path.suffix == ".png":
                Image.open(path).load()
        except Exception as err:
            pytest.fail(f"{context}: {path} unreadable after the kill ({type(err).__name__}: {err})")


def kill_and_resume(
    tool: str,
    argv: Callable[[Path, bool], list[str]],
    tmp_path: Path,
    compare: Callable[[Path, Path], None],
    writing_checkpoint: bool = True,
) -> None:
    """An uninterrupted reference run, then runs killed and resumed until done, every completed one
    compared with the reference (a new run directory when one completes with kills still to come).
    The kills: first (``writing_checkpoint``) while a checkpoint replaces an earlier one, then
    KILLS at random delays within the reference's duration (the part a resume has left to do)."""
    print(f"fault seed {SEED}")
    rng = random.Random(f"{SEED}-{tool}")
    warm_up = SERVER.Process(target=time.sleep, args=(0,))  # starts the server: not part of the timing
    warm_up.start()
    warm_up.join()
    started = time.perf_counter()
    run_attempt(tool, argv(tmp_path / "reference", False), tmp_path / "reference.log")
    duration = time.perf_counter() - started
    plan = ["writing checkpoint"] * writing_checkpoint + ["random"] * KILLS
    kills: list[str] = []
    interrupted: set[Path] = set()
    chain = 0
    while True:
        out = tmp_path / f"run{chain}"
        kind = plan[0] if plan else None
        left = duration * (1 - done_fraction(out, tmp_path / "reference"))
        delay = rng.uniform(0, max(left, duration / 5)) if kind == "random" else None
        when = checkpoint_rewrite(out) if kind == "writing checkpoint" else None
        log = tmp_path / f"run{chain}.log"
        outcome = run_attempt(tool, argv(out, (out / "checkpoint.pt").is_file()), log, delay, when)
        if kind == "writing checkpoint":
            plan.pop(0)  # tried once: a run may write no second checkpoint while it is watched
        if outcome == "killed":
            assert_every_file_loads(out, f"{tool}, fault seed {SEED}, after kill {len(kills) + 1}")
            if kind == "random":
                plan.pop(0)
            landed = f"{delay:.2f}s" if kind == "random" else kind
            kills.append(f"{landed}: {state_after_kill(out, interrupted)}")
            interrupted = temporaries(out)
            continue
        assert_every_file_loads(out, f"{tool}, fault seed {SEED}, completed")
        compare(tmp_path / "reference", out)
        if not plan:
            break
        chain += 1
        interrupted = set()
    left = sum(len(temporaries(tmp_path / f"run{i}")) for i in range(chain + 1))
    print(
        f"{tool}: {duration:.1f}s uninterrupted, {chain + 1} run(s), {left} temporary files left; killed at"
    )
    print("\n".join(f"  {kill}" for kill in kills))


def done_fraction(run_dir: Path, reference: Path) -> float:
    """The share of the reference run's work a resume skips: the epochs checkpointed, or the proposal
    shards written. Kill delays are drawn within the rest, so that they land before the run ends."""
    checkpoint = run_dir / "checkpoint.pt"
    if checkpoint.is_file():
        state = torch.load(checkpoint, map_location="cpu", weights_only=True, mmap=True)
        return state["epoch"] / state["config"]["train"]["epochs"]
    if (reference / "checkpoint.pt").is_file():  # a trainer: its proposal shards are little of it
        return 0.0
    return len(list(run_dir.rglob("shard_*.npz"))) / len(list(reference.rglob("shard_*.npz")))


def checkpoint_rewrite(run_dir: Path) -> Callable[[], bool]:
    """A test that holds once a checkpoint exists and its successor is being written: atomic_write's
    temporary file, or (were it written in place) the checkpoint itself changing."""
    checkpoint = run_dir / "checkpoint.pt"
    first: list[tuple[int, int]] = []

    def rewriting() -> bool:
        if not checkpoint.is_file():
            return False
        stat = checkpoint.stat()
        first[:] = first or [(stat.st_mtime_ns, stat.st_size)]
        return first[0] != (stat.st_mtime_ns, stat.st_size) or any(run_dir.glob(".checkpoint.pt.*.tmp"))

    return rewriting


def temporaries(directory: Path) -> set[Path]:
    return {p for p in directory.rglob("*") if ".tmp" in p.name}


def state_after_kill(directory: Path, earlier: set[Path]) -> str:
    """Where a kill landed: what the last checkpoint holds or how many shards exist, and the writes
    it cut short (temporary files left behind)."""
    parts = []
    checkpoint = directory / "checkpoint.pt"
    if checkpoint.is_file():
        state = torch.load(checkpoint, map_location="cpu", weights_only=True, mmap=True)
        parts.append(f"checkpoint at epoch {state['epoch']} step {state['step']}")
    elif (directory / "config.yaml").is_file():
        parts.append("no checkpoint yet")
    shards = len(list(directory.rglob("shard_*.npz")))
    if shards:
        parts.append(f"{shards} proposal shards")
    parts += [f"writing {name}" for name in sorted(p.name for p in temporaries(directory) - earlier)]
    return ", ".join(parts) or "nothing written yet"


def resume_flag(resume: bool) -> list[str]:
    return ["--resume"] if resume else []


def assert_weights_equal(reference: Path, resumed: Path) -> None:
    full = torch.load(reference, map_location="cpu", weights_only=True)["model"]
    again = torch.load(resumed, map_location="cpu", weights_only=True)["model"]
    assert full.keys() == again.keys()
    for name, value in full.items():
        torch.testing.assert_close(again[name], value, rtol=0, atol=1e-6, msg=f"{resumed}: {name}")


def history(run_dir: Path) -> list[dict]:
    """metrics.jsonl without its timings."""
    return [
        {k: v for k, v in record.items() if not k.endswith(TIMING_KEYS)}
        for record in read_metrics(run_dir / "metrics.jsonl")
    ]


def assert_same_training(reference: Path, resumed: Path) -> None:
    assert_weights_equal(reference / "model.pt", resumed / "model.pt")
    assert_weights_equal(reference / "checkpoint.pt", resumed / "checkpoint.pt")
    assert history(resumed) == history(reference), f"{resumed}: metrics history differs"


def test_train_cls_survives_kills(tmp_path: Path) -> None:
    def argv(out: Path, resume: bool) -> list[str]:
        return [
            "--config", "configs/cls/synthetic_tiny.yaml", "--out", str(out), *resume_flag(resume),
            "--set", "deterministic=true", "--set", "threads=1", "--set", "model.aux_logits=false",
            "--set", "data.image_size=32", "--set", "data.synthetic_train_size=16",
            "--set", "data.synthetic_val_size=4", "--set", "data.workers=0",
            "--set", "data.eval_batch_size=4",
            "--set", "train.batch_size=4", "--set", "train.epochs=3", "--set", "train.log_interval=1",
        ]  # fmt: skip

    kill_and_resume("train_cls", argv, tmp_path, assert_same_training)


@pytest.fixture(scope="module")
def scenes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """16 synthetic shape scenes as COCO JSON, for the tools that read a data set."""
    root = tmp_path_factory.mktemp("scenes")
    return write_synthetic_detection_split(root, "train", num_images=16, image_size=96)


def read_json(path: Path):
    return json.loads(path.read_text())


def write_yaml(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config))
    return path


def test_train_multibox_survives_kills(tmp_path: Path, scenes: Path) -> None:
    config = write_yaml(tmp_path / "multibox.yaml", {
        "deterministic": True, "threads": 1,
        "model": {"init": None, "stage": "inception4e", "num_priors": 4, "reduced_channels": 16, "grid": 4},
        "data": {"train": [{"path": str(scenes)}], "val_fraction": 0.25, "image_size": 64,
                 "cache_shorter_side": 64, "eval_batch_size": 4},
        "train": {"epochs": 3, "batch_size": 4, "warmup_epochs": 0.0, "log_interval": 1, "recall_top_k": [1]},
    })  # fmt: skip

    def argv(out: Path, resume: bool) -> list[str]:
        return ["--config", str(config), "--out", str(out), *resume_flag(resume)]

    def compare(reference: Path, resumed: Path) -> None:
        assert_same_training(reference, resumed)
        assert_weights_equal(reference / "best.pt", resumed / "best.pt")

    kill_and_resume("train_multibox", argv, tmp_path, compare)


def test_train_det_survives_kills(tmp_path: Path) -> None:
    config = write_yaml(tmp_path / "det.yaml", {
        "deterministic": True, "threads": 1,
        "model": {"variant": "bn", "input_size": 48, "padding": 4, "aux_logits": False},
        "data": {"synthetic_train_images": 4, "synthetic_val_images": 2, "synthetic_image_size": 96},
        "proposals": {"method": "ss", "ss": {"preset": "fast", "min_size": 8, "max_proposals": 40},
                      "workers": 1, "shard_size": 2},
        "sampler": {"images_per_batch": 2, "regions_per_batch": 16},
        "optim": {"lr": 0.01},
        "train": {"epochs": 3, "log_interval": 1},
        # Every region scored: an untrained detector's detections, not an empty list, are compared.
        "test": {"metrics": ["voc"], "region_batch": 32, "score_threshold": 0.0, "max_per_image": 20},
    })  # fmt: skip

    def argv(out: Path, resume: bool) -> list[str]:
        # Scenes and proposals inside the run directory: a kill can land while they are written.
        places = ["--set", f"data.synthetic_root={out}/scenes", "--set", f"proposals.cache_dir={out}/cache"]
        return ["--config", str(config), "--out", str(out), *places, *resume_flag(resume)]

    def compare(reference: Path, resumed: Path) -> None:
        assert_same_training(reference, resumed)
        detections = read_json(reference / "detections_val.json")
        assert detections, "nothing detected: the comparison would be empty"
        assert read_json(resumed / "detections_val.json") == detections
        assert read_json(resumed / "eval_val.json") == read_json(reference / "eval_val.json")

    kill_and_resume("train_det", argv, tmp_path, compare)


def cache_files(root: Path) -> list[Path]:
    return sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file() and ".tmp" not in p.name)


def test_propose_survives_kills(tmp_path: Path, scenes: Path) -> None:
    make_multibox_file(tmp_path / "multibox.pt", seed=0)
    config = write_yaml(tmp_path / "propose.yaml", {
        "name": "tiny", "splits": {"train": {"path": str(scenes)}}, "method": "both",
        "ss": {"preset": "fast", "min_size": 8, "max_proposals": 40},
        "multibox": {"model": str(tmp_path / "multibox.pt"), "top_k": 5},
        "workers": 2, "shard_size": 2,
    })  # fmt: skip

    def argv(out: Path, resume: bool) -> list[str]:
        return ["--config", str(config), "--split", "train", "--no-progress", "--set", f"cache_dir={out}"]

    def compare(reference: Path, resumed: Path) -> None:
        files = cache_files(reference)
        assert cache_files(resumed) == files
        for name in files:
            if name.suffix == ".json":  # the manifests, which name their directories
                manifest = (resumed / name).read_text().replace(str(resumed), str(reference))
                assert json.loads(manifest) == read_json(reference / name), name
                continue
            with np.load(reference / name) as full, np.load(resumed / name) as part:
                assert full.files == part.files
                for key in full.files:
                    if key != "seconds":  # timings
                        np.testing.assert_array_equal(part[key], full[key], err_msg=f"{name}: {key}")

    kill_and_resume("propose", argv, tmp_path, compare, writing_checkpoint=False)
