"""How many evaluators an eval worker keeps warm: a real worker, a watch with two evaluators taken in turn.

With ASSAYER_MAX_WARM=1 (or ASSAYER_MAX_WARM_EVALUATORS=1) each evaluation of the other evaluator
evicts the warm child and starts a fresh one: every evaluation still succeeds, and the evicted
children are gone at once (killed and reaped, no zombies). With room for both, each evaluator keeps
one child for every checkpoint. When the worker stops, no evaluator process outlives it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import redis
from harness import Workers, final_results, wait_for
from writers import zip_bytes
from zygote import Forked

from assayer import ledger, watches
from assayer.settings import Settings

EVALUATORS = '''
import os

CALLS = 0


def _seen(path):
    global CALLS
    CALLS += 1
    return {"pid": os.getpid(), "ppid": os.getppid(), "calls": CALLS}


def first(path):
    return _seen(path)


def second(path):
    return _seen(path)
'''
CHECKPOINTS = 3


def evaluate_in_turn(conn: redis.Redis, settings: Settings, workers: Workers, tmp_path: Path,
                     env: dict[str, str]) -> tuple[list[dict[str, Any]], Forked]:
    """Three checkpoints x evaluators ``first`` and ``second``, queued so that they alternate, run by
    one real eval worker with ``env``; returns the final results in the order they ran, and the worker."""
    (tmp_path / "evals.py").write_text(EVALUATORS)
    run = tmp_path / "run"
    run.mkdir()
    refs = [f"{name}={tmp_path / 'evals.py'}:{name}" for name in ("first", "second")]
    spec, _ = watches.build_spec(str(run), refs, name="run", eval_existing=True)
    watches.register(conn, settings, spec)
    worker = workers.start("eval", env)
    for i in range(CHECKPOINTS):
        (run / f"step_{(i + 1) * 10}.pt").write_bytes(zip_bytes(i))
    cands = spec.scanner(settings).scan(float("inf")).ready
    assert len(cands) == CHECKPOINTS
    assert len(ledger.enqueue_new(conn, settings, spec, cands)) == 2 * CHECKPOINTS  # one job each, alternating
    def all_done() -> list[dict[str, Any]] | None:
        recs = final_results(conn, "run")
        return recs if len(recs) == 2 * CHECKPOINTS else None

    done = wait_for(all_done, 60, what=f"{2 * CHECKPOINTS} final results")
    assert [r["status"] for r in done] == ["ok"] * len(done), [r.get("error") for r in done]
    ran = sorted(done, key=lambda r: r["started_at"])
    assert [r["evaluator"] for r in ran] == ["second", "first"] * CHECKPOINTS  # newest first, evaluators in turn
    return ran, worker


def _stat(pid: int) -> tuple[str, int] | None:
    """A process's state letter and parent pid, from /proc (None once it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rpartition(")")[2].split()
    except OSError:
        return None
    return fields[0], int(fields[1])


def evaluator_children(worker: Forked) -> set[int]:
    """The worker's evaluator processes now, and theirs (zombies included: a child not reaped shows up here)."""
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (found := _stat(int(entry))) is not None:
            parents[int(entry)] = found[1]
    out: set[int] = set()
    todo = [worker.pid]
    while todo:
        pid = todo.pop()
        kids = {child for child, parent in parents.items() if parent == pid}
        out |= kids
        todo += list(kids)
    return out


def gone(pid: int) -> bool:
    """No such process, not even a zombie waiting to be reaped."""
    found = _stat(pid)
    return found is None or found[0] == "X"


@pytest.mark.slow
@pytest.mark.parametrize("variable", ["ASSAYER_MAX_WARM", "ASSAYER_MAX_WARM_EVALUATORS"])
def test_one_warm_evaluator_is_replaced_by_the_next_and_every_evaluation_succeeds(
    conn: redis.Redis, settings: Settings, workers: Workers, tmp_path: Path, variable: str
) -> None:
    ran, worker = evaluate_in_turn(conn, settings, workers, tmp_path, {variable: "1"})
    pids = [r["metrics"]["pid"] for r in ran]
    assert len(set(pids)) == len(pids)  # each evaluation evicted the other evaluator's child: a fresh one each time
    assert {r["metrics"]["ppid"] for r in ran} == {worker.pid}  # children of the worker itself
    assert [r["metrics"]["calls"] for r in ran] == [1] * len(ran)  # none was warm
    assert evaluator_children(worker) == {pids[-1]}  # only the last one is kept, and nothing else is left
    evicted = [pid for pid in pids[:-1] if not gone(pid)]
    assert not evicted, f"evicted evaluator processes still there: {evicted}"
    workers.stop_all()
    assert worker.returncode == 0
    wait_for(lambda: gone(pids[-1]), 10, what=f"the warm evaluator {pids[-1]} to go with its worker")


@pytest.mark.slow
def test_with_room_for_both_each_evaluator_keeps_its_process_for_every_checkpoint(
    conn: redis.Redis, settings: Settings, workers: Workers, tmp_path: Path
) -> None:
    ran, worker = evaluate_in_turn(conn, settings, workers, tmp_path, {"ASSAYER_MAX_WARM": "2"})
    by_evaluator: dict[str, list[int]] = {}
    for rec in ran:
        by_evaluator.setdefault(rec["evaluator"], []).append(rec["metrics"]["pid"])
    assert {name: len(set(pids)) for name, pids in by_evaluator.items()} == {"first": 1, "second": 1}
    warm = {pids[0] for pids in by_evaluator.values()}
    assert len(warm) == 2
    assert [r["metrics"]["calls"] for r in ran if r["evaluator"] == "first"] == list(range(1, CHECKPOINTS + 1))
    assert evaluator_children(worker) == warm
    workers.stop_all()
    assert worker.returncode == 0
    wait_for(lambda: all(gone(pid) for pid in warm), 10, what=f"the warm evaluators {sorted(warm)} to go with their worker")
