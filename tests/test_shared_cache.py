"""Shared caches and concurrent cells: locks, modes that follow the umask, caches that verify what they trust."""

import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT, tiny_overrides
from PIL import Image
from test_paper_scale import make_tree, prepare_tree

from i2i_unlearning.atomic import locked, share, write_json
from i2i_unlearning.data.image_folder import ImageFolderSource
from i2i_unlearning.data.prepare import load_manifest
from i2i_unlearning.errors import DataError


@pytest.mark.slow
def test_concurrent_cells_on_a_cold_cache_build_each_artefact_once(tmp_path):
    """Two processes on one cell and a third on another cell, started together on an empty cache: all exit
    0; the data, the feature net and the original are built once (the others wait on their locks), the
    shared cell runs once and its second process finds it finished."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "PYTHONPATH": str(ROOT)}
    cells = [tiny_overrides(tmp_path, "mae", method) for method in ("ours", "ours", "noisy_label")]
    procs = [subprocess.Popen([sys.executable, "-m", "i2i_unlearning", *cell], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for cell in cells]
    logs = [p.communicate(timeout=600)[0] for p in procs]
    both = "".join(logs)
    assert [p.returncode for p in procs] == [0, 0, 0], both[-4000:]
    assert both.count("] prepared data ") == 1 and both.count("training the original") == 1, both[-4000:]
    assert both.count("already finished, skipping") == 1
    results = [json.loads(p.read_text()) for p in (tmp_path / "runs").rglob("metrics.json")]
    assert sorted(r["method"] for r in results) == ["noisy_label", "ours"]
    assert all(r["status"] == "ok" for r in results)


def test_a_held_lock_makes_another_process_wait(tmp_path):
    lock = tmp_path / "x.lock"
    probe = ("import sys; from filelock import FileLock; l = FileLock(sys.argv[1]);"
             "l.acquire(timeout=0.2); print('acquired')")
    with locked(lock, "x"):
        busy = subprocess.run([sys.executable, "-c", probe, str(lock)], capture_output=True, text=True)
    free = subprocess.run([sys.executable, "-c", probe, str(lock)], capture_output=True, text=True)
    assert "Timeout" in busy.stderr and free.stdout.strip() == "acquired"


def test_files_and_dirs_follow_the_umask(tmp_path):
    old = os.umask(0o002)  # a group-shared cache
    try:
        write_json(tmp_path / "a.json", {"x": 1})
        (tmp_path / "d").mkdir()
        os.chmod(tmp_path / "d", 0o700)
        share(tmp_path / "d", directory=True)
        data_dir = prepare_tree(make_tree(tmp_path / "tree", corrupt=False), tmp_path / "data")
    finally:
        os.umask(old)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o664
    assert (tmp_path / "d").stat().st_mode & 0o777 == 0o775
    assert data_dir.stat().st_mode & 0o777 == 0o775  # made by mkdtemp (0700), then shared
    assert (data_dir / "manifest.json").stat().st_mode & 0o777 == 0o664


def test_an_edited_manifest_count_is_refused_naming_the_split(tmp_path):
    data_dir = prepare_tree(make_tree(tmp_path / "tree", corrupt=False), tmp_path / "data")
    load_manifest(data_dir)  # control: as written, the counts add up
    manifest = json.loads((data_dir / "manifest.json").read_text())
    manifest["splits"]["retain_train"]["count"] = 9600
    (data_dir / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="split 'retain_train' does not add up.*9600"):
        load_manifest(data_dir)


def test_a_replaced_image_file_makes_a_new_data_dir(tmp_path):
    tree = make_tree(tmp_path / "tree", corrupt=False)
    before = ImageFolderSource(str(tree)).settings()
    assert ImageFolderSource(str(tree)).settings() == before  # control: the same files, the same fingerprint
    target = next((tree / "train" / "n003").glob("*.png"))
    Image.new("RGB", (31, 17), (200, 10, 10)).save(target)  # same name, other content
    assert ImageFolderSource(str(tree)).settings()["files_sha256"] != before["files_sha256"]


def test_a_killed_preparation_leaves_no_temp_dir_behind_the_next_run(tmp_path):
    tree = make_tree(tmp_path / "tree", corrupt=False)
    data_dir = prepare_tree(tree, tmp_path / "data")
    orphan = tmp_path / "data" / f".{data_dir.name}.tmp-killed"
    (orphan / "half").mkdir(parents=True)
    other = tmp_path / "data" / ".some-other-dir.tmp-x"  # another data dir's build: not ours to remove
    other.mkdir()
    assert prepare_tree(tree, tmp_path / "data") == data_dir
    assert not orphan.exists() and other.exists()
