"""Change notification (inotify) on real directories, and the network-filesystem test that turns it off."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import redis
from harness import Workers, add_watch, final_results, wait_for
from writers import save_dcp

from assayer import defaults
from assayer.notify import Notifier, network_filesystem
from assayer.settings import Settings

QUIET_AFTER = 3.0
"""Seconds without a change before a watch counts as quiet in these tests (10 s by default)."""


def test_a_change_in_a_watched_directory_wakes_its_watches_and_only_theirs(tmp_path: Path) -> None:
    woken: list[set[str]] = []
    notifier = Notifier(woken.append)
    a, b, shared = tmp_path / "a", tmp_path / "b", tmp_path / "shared"
    for d in (a, b, shared):
        d.mkdir()
    assert notifier.sync("wa", str(a), [str(a), str(shared)]) and notifier.covers("wa")
    assert notifier.sync("wb", str(b), [str(b), str(shared)])
    stop = threading.Event()
    thread = threading.Thread(target=notifier.run, args=(stop, 0.05), daemon=True)
    thread.start()
    try:
        (a / "step-1.pt").write_bytes(b"x")
        wait_for(lambda: {"wa"} in woken, 5, what="watch wa woken")
        assert all("wb" not in w for w in woken)
        woken.clear()
        (shared / "c.pt").write_bytes(b"x")  # one directory, two watches: both wake
        wait_for(lambda: any(w == {"wa", "wb"} for w in woken), 5, what="both watches woken")
        notifier.drop("wa")
        woken.clear()
        (shared / "d.pt").write_bytes(b"x")
        wait_for(lambda: woken, 5, what="a wake")
        assert all(w == {"wb"} for w in woken)  # the directory stays watched for wb only
        notifier.sync("wb", str(b), [str(b)])  # the scanner no longer lists shared
        woken.clear()
        (shared / "e.pt").write_bytes(b"x")
        (b / "f.pt").write_bytes(b"x")
        wait_for(lambda: woken, 5, what="a wake")
        assert all(w == {"wb"} for w in woken)
    finally:
        stop.set()
        thread.join(5)
        notifier.close()


def test_network_mounts_are_recognised_from_mountinfo(tmp_path: Path) -> None:
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text(
        "22 1 0:21 / / rw,relatime shared:1 - ext4 /dev/sda1 rw\n"
        "40 22 0:35 / /mnt/ckpts rw,relatime shared:20 - nfs4 server:/export rw,vers=4.2\n"
        "41 22 0:36 / /mnt/bucket rw,relatime shared:21 - fuse.gcsfuse bucket rw\n"
        "42 22 0:37 / /mnt/local\\040disk rw - xfs /dev/sdb rw\n"
    )
    assert network_filesystem("/mnt/ckpts/run1", str(mountinfo)) == "nfs4"
    assert network_filesystem("/mnt/bucket", str(mountinfo)) == "fuse.gcsfuse"
    assert network_filesystem("/mnt/local disk/run", str(mountinfo)) is None
    assert network_filesystem("/mnt/ckptsX/run", str(mountinfo)) is None  # a prefix of the name is not the mount
    assert network_filesystem("/home/user", str(mountinfo)) is None


def test_a_network_watch_is_never_covered(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import assayer.notify as notify

    monkeypatch.setattr(notify, "network_filesystem", lambda path: "nfs4")
    notifier = Notifier(lambda names: None)
    try:
        assert not notifier.sync("w", str(tmp_path), [str(tmp_path)]) and not notifier.covers("w")
    finally:
        notifier.close()


def scans_during(conn: redis.Redis, seconds: float) -> int:
    """Scan jobs the watch worker finished in the next ``seconds`` (rq keeps them a minute)."""
    from rq.registry import FinishedJobRegistry

    registry = FinishedJobRegistry(defaults.WATCH_QUEUE, connection=conn)
    before = set(registry.get_job_ids())
    time.sleep(seconds)
    return len(set(registry.get_job_ids()) - before)


@pytest.mark.slow
def test_a_quiet_watch_is_polled_rarely_yet_a_new_checkpoint_wakes_it_at_once(
    conn: redis.Redis, settings: Settings, workers: Workers, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    add_watch(conn, settings, run)
    workers.start("eval")  # first: a watch is active for QUIET_AFTER (3 s) from the watch worker's first scan
    workers.start("watch", {"ASSAYER_QUIET_AFTER": str(QUIET_AFTER)})
    assert scans_during(conn, 3) >= 5  # active: every poll interval (0.2 s here)
    time.sleep(QUIET_AFTER)
    assert scans_during(conn, 6) <= 1  # quiet and notified: every 30 s
    save_dcp(run / "step-1")
    rec = wait_for(lambda: final_results(conn, "run"), 5, what="the change to wake the quiet watch")[0]
    assert rec["relpath"] == "step-1"


@pytest.mark.slow
def test_without_notification_a_quiet_watch_keeps_the_idle_poll_interval(
    conn: redis.Redis, settings: Settings, workers: Workers, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    add_watch(conn, settings, run)
    workers.start("watch", {"ASSAYER_INOTIFY": "false", "ASSAYER_QUIET_AFTER": str(QUIET_AFTER)})
    time.sleep(QUIET_AFTER + 1)
    scans = scans_during(conn, 3 * settings.idle_poll_interval)
    assert 1 <= scans <= 4  # every idle_poll_interval (2 s), not every poll interval (0.2 s: 30 scans)
