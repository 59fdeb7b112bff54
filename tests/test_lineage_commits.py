"""Background `dvc commit`s (kd_core.pipeline.dvc): queued in order, waited for by readers of dvc.lock, errors kept."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from kd_core.pipeline import dvc
from kd_core.pipeline.dvc import DvcBook
from kd_core.tracking import lineage

DVC = str(Path(sys.executable).parent / "dvc")


def _dvc_project(root):
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    subprocess.run([DVC, "init", "-q"], cwd=root, check=True)
    (root / "dvc.yaml").write_text("stages:\n  make:\n    cmd: echo\n    outs: [out.txt]\n  copy:\n"
                                   "    cmd: echo\n    deps: [out.txt]\n    outs: [copy.txt]\n")


def test_background_commits_are_in_dvc_lock_when_it_is_read(tmp_path, monkeypatch):
    monkeypatch.setenv("DVC_SITE_CACHE_DIR", str(tmp_path / "site"))
    monkeypatch.chdir(tmp_path)  # stage names resolve against the working directory, as in a run
    _dvc_project(tmp_path)
    (tmp_path / "out.txt").write_text("a\n")
    (tmp_path / "copy.txt").write_text("a\n")
    book = DvcBook(tmp_path)
    book.record("make", background=True)
    book.record("copy", background=True)
    dvc.settle_commits()  # waits for both
    text = lineage.read_lock(tmp_path)
    assert set(lineage.lock_outputs(text)) == {"make", "copy"}
    assert book.changed() == set()


def test_a_failed_background_commit_raises_when_settled(tmp_path, monkeypatch):
    monkeypatch.setenv("DVC_SITE_CACHE_DIR", str(tmp_path / "site"))
    monkeypatch.chdir(tmp_path)  # stage names resolve against the working directory, as in a run
    _dvc_project(tmp_path)  # out.txt does not exist: committing `make` fails
    DvcBook(tmp_path).record("make", background=True)
    with pytest.raises(Exception, match="out.txt"):
        dvc.settle_commits()
    dvc.settle_commits()  # reported once: nothing pending afterwards


def test_recording_a_stage_leaves_its_outputs_in_place(tmp_path, monkeypatch):
    """The flow commits a stage in the background while the next stage reads its outputs: DVC's default relink
    (remove each output, copy it back from the cache) left a moment without the file, and the next stage failed
    with MissingInput now and then. A file held open across the commit must still be the file at its path."""
    monkeypatch.setenv("DVC_SITE_CACHE_DIR", str(tmp_path / "site"))
    monkeypatch.chdir(tmp_path)
    _dvc_project(tmp_path)
    (tmp_path / "out.txt").write_text("a\n")
    book = DvcBook(tmp_path)
    assert book.changed() == {"make", "copy"}
    with open(tmp_path / "out.txt", "rb") as held:  # held open: its inode cannot be reused by a new file
        book.record("make")
        assert os.fstat(held.fileno()).st_nlink == 1  # 0: the path was unlinked (and a copy put there)
        assert os.path.samestat(os.fstat(held.fileno()), os.stat(tmp_path / "out.txt"))
    assert "make" not in book.changed()  # recorded all the same: dvc.lock and the cache hold it
    cached = tmp_path / ".dvc/cache/files/md5"
    assert [p.read_text() for p in cached.rglob("*") if p.is_file()] == ["a\n"]
