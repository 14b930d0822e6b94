"""The ledger, evaluator references and the watches file, in process: a real Redis, no worker processes.

The exactly-once rule (one eval job per checkpoint version) is the ledger's; these tests hold it
directly, many times over, where the pipeline tests can only sample it through real workers.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path

import pytest
import redis
from harness import RedisServer, add_watch, burst, evaluator_ref, final_results, hash_json
from writers import torch_bytes, zip_bytes

from assayer import keys, ledger, watches
from assayer.errors import ConfigError, EvaluatorError
from assayer.evaluator import EvaluatorRef, parse_ref
from assayer.rq_internals import queue_key
from assayer.scan import Candidate
from assayer.settings import Settings
from assayer.watches import WatchSpec


def candidates(spec: WatchSpec, settings: Settings) -> list[Candidate]:
    """What a scan long after the last write hands over."""
    return spec.scanner(settings).scan(time.time() + 3600).ready


def test_a_version_is_queued_once_however_often_it_is_offered(conn: redis.Redis, settings: Settings, tmp_path: Path) -> None:
    add_watch(conn, settings, tmp_path / "run")
    spec = watches.require(conn, "run")
    (tmp_path / "run" / "a.pt").write_bytes(torch_bytes(1))
    ready = candidates(spec, settings)
    (job_id,) = ledger.enqueue_new(conn, settings, spec, ready)
    assert ledger.enqueue_new(conn, settings, spec, ready) == []  # offered again: the ledger has it
    assert conn.llen(queue_key(settings.eval_queue)) == 1 and conn.smembers(keys.pending("run")) == {job_id.encode()}
    assert hash_json(conn, keys.ledger("run"), "a.pt")["job"] == job_id

    os.utime(tmp_path / "run" / "a.pt", (1, 1))  # a rewrite in place: a new version
    (new_id,) = ledger.enqueue_new(conn, settings, spec, candidates(spec, settings))
    assert new_id != job_id
    (forced,) = ledger.enqueue_new(conn, settings, spec, candidates(spec, settings), force=True)  # `evaluate PATH`
    assert forced not in (job_id, new_id) and conn.llen(queue_key(settings.eval_queue)) == 3
    burst(settings, conn)
    assert sorted(r["job_id"] for r in final_results(conn, "run")) == sorted([job_id, new_id, forced])
    assert conn.scard(keys.pending("run")) == 0


def test_workers_offering_the_same_versions_at_once_queue_each_exactly_once(
    conn: redis.Redis, settings: Settings, redis_server: RedisServer, tmp_path: Path
) -> None:
    add_watch(conn, settings, tmp_path / "run")
    spec = watches.require(conn, "run")
    for i in range(60):
        (tmp_path / "run" / f"{i}.pt").write_bytes(zip_bytes(i))
    ready = candidates(spec, settings)
    assert len(ready) == 60
    queued: list[list[str]] = []
    start = threading.Barrier(8)

    def offer(order: int) -> None:
        with redis.Redis.from_url(redis_server.url) as own:  # one connection per "watch worker"
            start.wait()
            queued.append(ledger.enqueue_new(own, settings, spec, ready[order % 7:] + ready[: order % 7]))

    threads = [threading.Thread(target=offer, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    ids = [job for batch in queued for job in batch]
    assert len(queued) == 8 and len(ids) == len(set(ids)) == 60
    assert conn.llen(queue_key(settings.eval_queue)) == 60 and conn.hlen(keys.ledger("run")) == 60


def test_existing_checkpoints_are_the_baseline_unless_eval_existing(
    conn: redis.Redis, settings: Settings, tmp_path: Path
) -> None:
    for name in ("old", "all"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "before.pt").write_bytes(torch_bytes())
    add_watch(conn, settings, tmp_path / "old", name="old")
    add_watch(conn, settings, tmp_path / "all", name="all", eval_existing=True)
    assert watches.baseline_size(conn, "old") == 1 and watches.baseline_size(conn, "all") == 0
    assert ledger.enqueue_new(conn, settings, watches.require(conn, "old"),
                              candidates(watches.require(conn, "old"), settings)) == []
    assert len(ledger.enqueue_new(conn, settings, watches.require(conn, "all"),
                                  candidates(watches.require(conn, "all"), settings))) == 1


def test_a_removed_watch_queues_nothing(conn: redis.Redis, settings: Settings, tmp_path: Path) -> None:
    add_watch(conn, settings, tmp_path / "run")
    spec = watches.require(conn, "run")
    (tmp_path / "run" / "a.pt").write_bytes(torch_bytes())
    ready = candidates(spec, settings)
    watches.remove(conn, "run")  # between the scan and its enqueue
    assert ledger.enqueue_new(conn, settings, spec, ready) == [] and conn.llen(queue_key(settings.eval_queue)) == 0


@pytest.mark.parametrize(("ref", "expected"), [
    ("evals/lm.py:score", EvaluatorRef(file="/base/evals/lm.py", module=None, func="score")),
    ("/abs/lm.py:score", EvaluatorRef(file="/abs/lm.py", module=None, func="score")),
    ("  mylab.evals.lm.score ", EvaluatorRef(file=None, module="mylab.evals.lm", func="score")),
    ("mylab.evals.lm:score", EvaluatorRef(file=None, module="mylab.evals.lm", func="score")),
    ("C:/odd:path.py:run", EvaluatorRef(file="/base/C:/odd:path.py", module=None, func="run")),
])
def test_evaluator_references_name_a_file_or_a_module_and_a_function(ref: str, expected: EvaluatorRef) -> None:
    assert parse_ref(ref, base_dir="/base") == expected


@pytest.mark.parametrize(("ref", "message"), [
    ("", "is empty"), ("lm.py", "names no function"), ("lm", "names no function"), ("lm.py.score", "names no function"),
    ("lm.py:not-a-name", "is not a function name"),
])
def test_bad_evaluator_references_say_what_is_wrong(ref: str, message: str) -> None:
    with pytest.raises(EvaluatorError, match=message):
        parse_ref(ref)


def test_the_watches_file_registers_its_watches_and_skips_only_the_bad_one(
    conn: redis.Redis, settings: Settings, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    good = tmp_path / "good"
    good.mkdir()
    (good / "old.pt").write_bytes(torch_bytes())
    path = tmp_path / "watches.yaml"
    path.write_text(
        "watches:\n"
        f"  - {{name: good, directory: {good}, evaluator: '{evaluator_ref('record')}', poll_interval: 2}}\n"
        f"  - {{name: broken, directory: {good}, evaluator: '{tmp_path}/missing.py:evaluate'}}\n"
        f"  - {{name: later, directory: {tmp_path / 'later'}, evaluator: '{evaluator_ref('record')}', eval_existing: true}}\n"
    )
    with caplog.at_level(logging.ERROR, logger="assayer.workers"):
        watches.sync_file(conn, settings.replace(watches_file=path))
    assert sorted(s.name for s in watches.all_specs(conn)) == ["good", "later"]
    assert "skipping broken" in caplog.text and "missing.py does not exist" in caplog.text
    assert watches.baseline_size(conn, "good") == 1 and watches.require(conn, "good").poll_interval == 2

    path.write_text(path.read_text().replace("poll_interval: 2", "poll_interval: 5"))
    watches.set_paused(conn, "good", True)
    watches.sync_file(conn, settings.replace(watches_file=path))  # a worker restarted with an edited file
    spec = watches.require(conn, "good")
    assert spec.poll_interval == 5 and spec.paused  # updated, and still paused as the user left it


@pytest.mark.parametrize(("text", "message"), [
    ("watches: [1, 2]", "must be a list of mappings"),
    ("watches:\n  - {directory: /d, evaluator: e.f, colour: red}", r"unknown key\(s\) \['colour'\]"),
    ("watches:\n  - {name: x, evaluator: e.f}", "needs directory and evaluator"),
    ("watches: [", "is not valid YAML"),
])
def test_a_broken_watches_file_is_refused_with_the_reason(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "watches.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        watches.load_file(path)
