"""The scanner on real directory trees: recursion, filters, versions, and a tree changing under it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from writers import torch_bytes, write_atomically

import assayer.scan as scan_module
from assayer.readiness import Format, check_format
from assayer.scan import Scanner, parse_epoch, parse_step


def ready(scanner: Scanner, now: float | None = None) -> set[str]:
    return {c.relpath for c in scanner.scan(now or time.time()).ready}


def settle_all(scanner: Scanner) -> set[str]:
    """Scan as if long after the last write, and hand everything over."""
    report = scanner.scan(time.time() + 3600)
    for c in report.ready:
        scanner.mark_done(c.relpath, c.version)
    return {c.relpath for c in report.ready}


def test_recurses_filters_and_ignores_partial_names(tmp_path: Path) -> None:
    for rel in ["a.pt", "b.pth", "c.ckpt", "d.model", "e.state", "f.safetensors", "deep/er/g.pt",
                "notes.txt", "h.pt.tmp", "i.pt.partial", "j.incomplete", ".hidden.pt", ".cache/k.pt",
                "l.pt.lock", "tmp-checkpoint-5/m.safetensors"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x" * 10)
    scanner = Scanner(str(tmp_path), settle=0)
    assert settle_all(scanner) == {"a.pt", "b.pth", "c.ckpt", "d.model", "e.state", "f.safetensors", "deep/er/g.pt"}


def test_user_regex_is_searched_in_the_absolute_path(tmp_path: Path) -> None:
    (tmp_path / "run1").mkdir()
    (tmp_path / "run2").mkdir()
    (tmp_path / "run1" / "a.pt").write_bytes(b"x" * 10)
    (tmp_path / "run2" / "a.pt").write_bytes(b"x" * 10)
    scanner = Scanner(str(tmp_path), regex=r"/run2/.*\.pt$", settle=0)
    assert settle_all(scanner) == {os.path.join("run2", "a.pt")}


def test_each_version_is_reported_until_handed_over_then_only_new_versions(tmp_path: Path) -> None:
    path = tmp_path / "last.ckpt"
    path.write_bytes(torch_bytes(1))
    scanner = Scanner(str(tmp_path), settle=0)
    assert ready(scanner) == {"last.ckpt"}
    assert ready(scanner) == {"last.ckpt"}  # not handed over yet: still a candidate
    settle_all(scanner)
    assert ready(scanner) == set()
    time.sleep(0.01)
    path.write_bytes(torch_bytes(2, size=3000))  # rewritten in place, as torch.save does
    assert ready(scanner) == {"last.ckpt"}
    settle_all(scanner)
    write_atomically(path, torch_bytes(3))  # replaced by rename: new inode
    assert ready(scanner) == {"last.ckpt"}


def test_deleted_files_and_directories_are_forgotten(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.pt").write_bytes(torch_bytes())
    (tmp_path / "b.pt").write_bytes(torch_bytes())
    scanner = Scanner(str(tmp_path), settle=0)
    assert settle_all(scanner) == {"sub/a.pt", "b.pt"}
    (tmp_path / "b.pt").unlink()
    (tmp_path / "sub" / "a.pt").unlink()
    (tmp_path / "sub").rmdir()
    report = scanner.scan(time.time())
    assert report.ready == [] and report.errors == [] and report.files == 0


def test_unknown_format_waits_for_the_settle_window(tmp_path: Path) -> None:
    path = tmp_path / "model.state"
    path.write_bytes(b"\x80\x04 pickled")
    mtime = path.stat().st_mtime
    scanner = Scanner(str(tmp_path), settle=2.0)
    report = scanner.scan(mtime + 0.5)
    assert report.ready == [] and report.pending == ["model.state"]
    assert report.next_check == pytest.approx(mtime + 2.0)
    assert {c.relpath for c in scanner.scan(mtime + 2.01).ready} == {"model.state"}


def test_incomplete_torch_file_is_pending_not_ready(tmp_path: Path) -> None:
    data = torch_bytes()
    (tmp_path / "a.pt").write_bytes(data[: len(data) // 2])
    scanner = Scanner(str(tmp_path), settle=0)
    report = scanner.scan(time.time() + 3600)  # however long ago: the format says it is not done
    assert report.ready == [] and report.pending == ["a.pt"]


def test_symlink_loops_and_links_to_directories(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "a.pt").write_bytes(b"x" * 10)
    os.symlink(tmp_path, tmp_path / "real" / "loop")
    os.symlink(tmp_path / "real", tmp_path / "alias")
    scanner = Scanner(str(tmp_path), settle=0)
    found = settle_all(scanner)
    assert len(found) == 1 and found <= {"real/a.pt", "alias/a.pt"}


def test_a_file_vanishing_mid_scan_is_skipped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "gone.pt").write_bytes(torch_bytes())
    (tmp_path / "kept.pt").write_bytes(torch_bytes())
    def delete_then_check(path: str, size: int) -> Format:
        if path.endswith("gone.pt"):
            os.unlink(path)  # deleted between stat and read, as a cleanup script would
        return check_format(path, size)

    monkeypatch.setattr(scan_module, "check_format", delete_then_check)
    report = Scanner(str(tmp_path), settle=0).scan(time.time())
    assert [c.relpath for c in report.ready] == ["kept.pt"] and report.errors == []


def test_missing_root_is_reported_not_raised(tmp_path: Path) -> None:
    scanner = Scanner(str(tmp_path / "not-yet"), settle=0)
    report = scanner.scan(time.time())
    assert report.missing_root and report.ready == []
    (tmp_path / "not-yet").mkdir()
    (tmp_path / "not-yet" / "a.pt").write_bytes(torch_bytes())
    assert ready(scanner) == {"a.pt"}


def test_unreadable_subdirectory_is_skipped_and_reported(tmp_path: Path) -> None:
    """Run as an unprivileged user (root reads everything): the readable part is still scanned."""
    import shutil
    import tempfile

    tmp_path = Path(tempfile.mkdtemp(dir="/tmp"))  # pytest's own tmp dir is closed to other users
    request_cleanup = lambda: shutil.rmtree(tmp_path, ignore_errors=True)  # noqa: E731
    tree = tmp_path / "tree"
    (tree / "locked").mkdir(parents=True)
    (tree / "open").mkdir()
    (tree / "open" / "a.pt").write_bytes(torch_bytes())
    (tree / "locked" / "b.pt").write_bytes(torch_bytes())
    for p in (tmp_path, tree, tree / "open", tree / "open" / "a.pt"):
        p.chmod(0o755 if p.is_dir() else 0o644)
    (tree / "locked").chmod(0o000)
    code = (
        "import json, os, sys, time\n"
        "from assayer.scan import Scanner\n"
        "if os.getuid() == 0: os.setgid(65534); os.setuid(65534)\n"
        "r = Scanner(sys.argv[1], settle=0).scan(time.time())\n"
        "print(json.dumps({'ready': [c.relpath for c in r.ready], 'errors': r.errors}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(tree)], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parent.parent, check=True)
    (tree / "locked").chmod(0o755)
    request_cleanup()
    report = json.loads(out.stdout)
    assert report["ready"] == ["open/a.pt"]
    assert len(report["errors"]) == 1 and "locked" in report["errors"][0] and "ermission" in report["errors"][0]


def test_incremental_scans_stat_only_changed_directories(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for d in range(20):
        for f in range(20):
            (tmp_path / f"d{d}").mkdir(exist_ok=True)
            (tmp_path / f"d{d}" / f"{f}.pt").write_bytes(b"x" * 10)
    old = time.time() - 7200
    for p in tmp_path.rglob("*.pt"):
        os.utime(p, (old, old))
    scanner = Scanner(str(tmp_path), settle=0, full_scan_interval=3600, hot_window=600)
    assert len(settle_all(scanner)) == 400
    calls = []
    real_stat = os.stat

    def counted_stat(path: Any, *args: Any, **kwargs: Any) -> os.stat_result:
        calls.append(path)
        return real_stat(path, *args, **kwargs)

    monkeypatch.setattr(os, "stat", counted_stat)  # the os module the scanner uses
    scanner.scan(time.time())
    assert len(calls) == 21  # the root and 20 directories; no file (all cold and handed over)
    (tmp_path / "d7" / "new.pt").write_bytes(b"y" * 10)
    calls.clear()
    assert {c.relpath for c in scanner.scan(time.time() + 1).ready} == {"d7/new.pt"}
    assert len(calls) == 21 + 21  # plus the files of the one changed directory


@pytest.mark.parametrize(("name", "step", "epoch"), [
    ("epoch=3-step=1200.ckpt", 1200, 3), ("step_500.pt", 500, None), ("iter-42.pth", 42, None),
    ("global_step1200/mp_rank_00_model_states.pt", 1200, None), ("checkpoint-500/model.safetensors", 500, None),
    # numbers that are not steps
    ("model_epoch7.pt", None, 7), ("epoch=3.ckpt", None, 3), ("model-00001-of-00004.safetensors", None, None),
    ("last-v1.ckpt", None, None), ("resnet50_best.pt", None, None), ("ckpt_000300.pt", None, None),
    ("last.ckpt", None, None), ("runs/500/model.pt", None, None),
])
def test_step_is_taken_only_from_names_that_say_so_and_epochs_stay_epochs(name: str, step: int | None,
                                                                          epoch: int | None) -> None:
    assert (parse_step(name), parse_epoch(name)) == (step, epoch)


def test_a_scan_over_its_time_budget_stops_says_so_and_the_next_ones_go_on(tmp_path: Path) -> None:
    for d in range(60):
        (tmp_path / f"d{d:02d}").mkdir()
        (tmp_path / f"d{d:02d}" / "a.pt").write_bytes(torch_bytes())
    scanner = Scanner(str(tmp_path), settle=0)
    seen: set[str] = set()
    rounds = 0
    while len(seen) < 60:
        report = scanner.scan(time.time(), budget=0.0005)
        seen |= {c.relpath for c in report.ready}
        for c in report.ready:
            scanner.mark_done(c.relpath, c.version)
        rounds += 1
        assert rounds < 200, "the scan made no progress"
    assert rounds > 1 and report.files == 60  # nothing cached was forgotten by a truncated scan
    assert scanner.scan(time.time()).truncated is False
