"""Watches and ledgers mirrored beside the results, so a Redis that lost Assayer's data can be rebuilt.

Redis holds the watches, the ledger and the results; run it with AOF and this module never acts.
When Redis loses its data anyway (run without AOF, wiped, replaced), re-adding a watch would
silently take every unevaluated checkpoint as its baseline. So:

* eval workers (which every deployment gives the results directory) mirror each watch's spec to
  ``<watch>.watch.json`` and its ledger to ``<watch>.ledger.json`` every few seconds;
* an *epoch* id lives both in Redis (``assayer:epoch``) and in ``.assayer-epoch`` in the results
  directory: a results directory with an epoch that Redis does not hold means Redis lost our data.
  Workers then flag it (``assayer status`` and the logs say so) and ``watch add`` refuses to take a
  baseline until ``assayer restore`` has run;
* ``assayer restore`` puts watches, ledgers and final results back from the files, then queues
  exactly the ledgered checkpoint versions that never got a final result. Checkpoints written
  while nothing was recorded are new versions to the restored ledger and are evaluated as usual.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
from pathlib import Path
from typing import Any

from . import keys, records, results
from .errors import ConfigError
from .records import LedgerEntry, ResultRecord, Slot

log = logging.getLogger("assayer.backup")

EPOCH_FILE = ".assayer-epoch"
SPEC_SUFFIX = ".watch.json"
LEDGER_SUFFIX = ".ledger.json"


class DataLost(ConfigError):
    """Redis lost the data this results directory remembers."""


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8").strip() or None
    except OSError:
        return None


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def check_epoch(conn: Any, results_dir: Path) -> str | None:
    """Compare Redis's epoch with the results directory's; flag and return the problem, or None."""
    ours = conn.get(keys.EPOCH)
    ours = ours.decode() if ours else None
    saved = _read(results_dir / EPOCH_FILE)
    problem = None
    if saved and ours != saved:
        known = sorted(p.name[: -len(SPEC_SUFFIX)] for p in results_dir.glob("*" + SPEC_SUFFIX))
        problem = (f"Redis lost Assayer's data: {results_dir} remembers {len(known)} watch(es) "
                   f"({', '.join(known[:5])}{' ...' if len(known) > 5 else ''}) that this Redis "
                   f"{'does not hold' if ours is None else 'is not the one of'}; run `assayer restore`")
    elif ours is None and not saved:
        ours = new_epoch(conn)
    if problem:
        if conn.get(keys.DATA_LOST) != problem.encode():
            log.error("%s", problem)
            conn.set(keys.DATA_LOST, problem)
        return problem
    if ours and not saved:
        try:
            results_dir.mkdir(parents=True, exist_ok=True)
            _write(results_dir / EPOCH_FILE, ours)
        except OSError as exc:
            log.warning("cannot write %s: %s", results_dir / EPOCH_FILE, exc.strerror or exc)
    conn.delete(keys.DATA_LOST)
    return None


def new_epoch(conn: Any) -> str:
    conn.set(keys.EPOCH, secrets.token_hex(8), nx=True)
    return str(conn.get(keys.EPOCH).decode())


def refuse_baseline_if_lost(conn: Any, results_dir: Path, watch: str) -> None:
    """``watch add`` must not take a baseline over checkpoints that a lost Redis never saw evaluated."""
    problem = conn.get(keys.DATA_LOST)
    if problem is None and not conn.exists(keys.EPOCH) and (results_dir / f"{watch}{SPEC_SUFFIX}").exists():
        problem = f"Redis does not know watch {watch}, which {results_dir} remembers".encode()
    if problem:
        raise DataLost(problem.decode(), "run `assayer restore` (it rebuilds watches and ledgers from the results "
                                         "directory), then add watches again if needed")
    new_epoch(conn)


def mirror(conn: Any, results_dir: Path) -> int:
    """Write every watch's spec and ledger beside its results (when changed); return how many files were written."""
    if conn.get(keys.DATA_LOST):
        return 0  # never overwrite what a restore needs with what an empty Redis says
    written = 0
    results_dir.mkdir(parents=True, exist_ok=True)
    specs = conn.hgetall(keys.WATCHES)
    for path in results_dir.glob("*" + SPEC_SUFFIX):
        if path.name[: -len(SPEC_SUFFIX)].encode() not in specs:
            forget(results_dir, path.name[: -len(SPEC_SUFFIX)])  # removed with `watch remove`
    for name, raw in specs.items():
        watch = name.decode()
        ledger = {k.decode(): json.loads(v) for k, v in conn.hgetall(keys.ledger(watch)).items()}
        for path, text in ((results_dir / f"{watch}{SPEC_SUFFIX}", raw.decode()),
                           (results_dir / f"{watch}{LEDGER_SUFFIX}", json.dumps(ledger, sort_keys=True))):
            if _read(path) != text.strip():
                _write(path, text)
                written += 1
    return written


def forget(results_dir: Path, watch: str) -> None:
    """A removed watch: its mirror goes (its results file stays)."""
    for suffix in (SPEC_SUFFIX, LEDGER_SUFFIX):
        with contextlib.suppress(OSError):
            (results_dir / f"{watch}{suffix}").unlink()


def restore(conn: Any, results_dir: Path) -> dict[str, dict[str, int]]:
    """Put watches, ledgers and final results back from ``results_dir``; return counts per watch.

    Entries Redis already has are kept, except baseline entries (no job) that the backup knows as
    queued or evaluated: a watch re-added over a lost Redis took those as its baseline wrongly.
    """
    summary: dict[str, dict[str, int]] = {}
    for spec_path in sorted(results_dir.glob("*" + SPEC_SUFFIX)):
        watch = spec_path.name[: -len(SPEC_SUFFIX)]
        spec = json.loads(spec_path.read_text(encoding="utf-8"))
        ledger = json.loads(_read(results_dir / f"{watch}{LEDGER_SUFFIX}") or "{}")
        finals = {r["job_id"]: r for r in results.load_files(results_dir, watch)}
        for rec in sorted(finals.values(), key=lambda r: r.get("finished_at") or ""):  # the newest wins
            ledger[rec["relpath"]] = json.loads(_with_result(ledger.get(rec["relpath"]), rec).to_json())
        counts = {"ledger": 0, "results": 0}
        if conn.hsetnx(keys.WATCHES, watch, json.dumps(spec, sort_keys=True)) and not spec.get("paused"):
            conn.zadd(keys.DUE, {watch: 0})
        current = {k.decode(): json.loads(v) for k, v in conn.hgetall(keys.ledger(watch)).items()}
        for relpath, entry in ledger.items():
            have = current.get(relpath)
            if have is None or (have.get("job") is None and entry.get("job")):
                conn.hset(keys.ledger(watch), relpath, json.dumps(entry))
                counts["ledger"] += 1
        for job_id, rec in finals.items():
            counts["results"] += conn.hsetnx(keys.results(watch), job_id, json.dumps(rec, sort_keys=True))
        summary[watch] = counts
    epoch = _read(results_dir / EPOCH_FILE)
    if epoch:
        conn.set(keys.EPOCH, epoch)
    conn.delete(keys.DATA_LOST)
    return summary


def _with_result(raw: dict[str, Any] | None, rec: ResultRecord) -> LedgerEntry:
    """A mirrored ledger entry with a final result put in its evaluator's slot (a new version starts afresh)."""
    entry = LedgerEntry.from_json(json.dumps(raw)) if raw else None
    slots = dict(entry.evals) if entry is not None and entry.version == rec["version"] else {}
    name = records.evaluator_name(rec)
    slots[name] = Slot(rec.get("evaluator_version") or None, rec["job_id"], 0)
    job = entry.job if entry is not None and entry.job and entry.version == rec["version"] else rec["job_id"]
    return LedgerEntry(rec["version"], job, 0, slots, rec.get("step"), rec.get("layout"))


def unfinished(conn: Any, watch: str, first: str | None = None) -> dict[str, tuple[str, list[str]]]:
    """Ledgered versions whose job has no final result and is not queued or running:
    relpath -> (version, the names of the evaluators whose job that is)."""
    done = {k.decode() for k in conn.hkeys(keys.results(watch))} | {k.decode() for k in conn.smembers(keys.pending(watch))}
    out = {}
    for relpath, raw in conn.hgetall(keys.ledger(watch)).items():
        entry = LedgerEntry.from_json(raw, first)
        names = [name for name, slot in entry.evals.items() if slot.job not in done]
        if names:
            out[relpath.decode()] = (entry.version, names)
    return out
