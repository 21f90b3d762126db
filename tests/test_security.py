"""Untrusted files never run code: checkpoints and weights load with weights_only, configs with
yaml.safe_load, proposal shards without pickle. Each crafted file carries a payload that creates a
marker file when unpickled; each test first proves the payload is live under an unsafe load."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO_ROOT

from backbone.runtime.checkpoint import load_checkpoint
from backbone.runtime.config import ConfigError, load_config
from backbone.runtime.errors import UserError
from backbone.weights import load_model, read_weights_file
from detect.proposals.cache import read_shard
from detect.proposals.multibox import load_multibox
from detect.rcnn.model import load_detector


class Payload:
    """Unpickling this calls open(marker, "w"): the marker's existence means the payload ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@dataclass(frozen=True)
class NamedSchema:
    name: str = "run"


@pytest.fixture
def crafted(tmp_path: Path) -> tuple[Path, Path]:
    """A torch file whose state dict hides the payload, and the marker it would create."""
    marker = tmp_path / "payload_ran"
    path = tmp_path / "evil.pt"
    torch.save({"model": {"fc.weight": torch.zeros(2, 2)}, "meta": Payload(marker)}, path)
    return path, marker


def test_the_payload_is_live_under_an_unsafe_load(crafted):
    path, marker = crafted
    torch.load(path, weights_only=False).get("meta").close()
    assert marker.exists()


@pytest.mark.parametrize(
    "loader", [load_checkpoint, read_weights_file, load_model, load_detector, load_multibox]
)
def test_every_model_loader_refuses_a_crafted_pickle(crafted, loader):
    path, marker = crafted
    with pytest.raises(UserError, match="evil.pt: not a readable"):
        loader(path)
    assert not marker.exists()


def test_a_tool_refuses_it_in_one_line_exit_2(crafted, tmp_path):
    path, marker = crafted
    images = tmp_path / "images"
    images.mkdir()
    proc = subprocess.run(
        [sys.executable, "tools/detect_images.py", "--checkpoint", str(path), str(images)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "evil.pt: not a readable" in proc.stderr and proc.stderr.count("\n") == 1
    assert not marker.exists()


def test_a_proposal_shard_holding_objects_is_recomputed_not_unpickled(tmp_path):
    marker = tmp_path / "payload_ran"
    shard = tmp_path / "shard.npz"
    ids = np.arange(2, dtype=np.int64)
    np.savez(shard, image_ids=ids, fingerprint=np.array("f"), boxes=np.array([Payload(marker)], dtype=object))
    with np.load(shard, allow_pickle=True) as data:  # the payload is live under an unsafe load...
        data["boxes"][0].close()
    assert marker.exists()
    marker.unlink()
    assert read_shard(shard, "f", ids) is None  # ...and the cache treats the shard as unreadable
    assert not marker.exists()


def test_a_config_with_a_python_tag_is_refused(tmp_path):
    marker = tmp_path / "payload_ran"
    config = tmp_path / "evil.yaml"
    config.write_text(f"name: !!python/object/apply:builtins.open ['{marker}', 'w']\n")
    with pytest.raises(ConfigError, match="evil.yaml: could not determine a constructor"):
        load_config(config, NamedSchema)
    assert not marker.exists()
