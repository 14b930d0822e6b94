"""Evaluation results: every attempt kept in Redis and in an append-only JSON-lines file per watch.

The file copy lets results survive the loss of Redis (``assayer results --source files``).
Exactly one *final* record exists per eval job: it is written with HSETNX, so a stale worker
that finishes after its job was taken over cannot add a second one.

Redis is the record; the file is a copy. A full or unwritable results directory never fails an
evaluation: the lines that could not be written wait in a backlog in Redis, ``assayer status``
shows why, and the copy catches up (in order) once the directory is writable again; ``assayer
results --export`` rebuilds the files from Redis at any time.
"""

from __future__ import annotations

import csv
import fcntl
import io
import json
import logging
import os
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from . import defaults, keys
from .directions import Direction, direction
from .records import FIELDS, LedgerEntry, ResultRecord, dump, evaluator_name, parse

log = logging.getLogger("assayer.results")


_RECORD_FINAL = """
if redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2]) == 1 then
  redis.call('RPUSH', KEYS[4], ARGV[2])
  redis.call('SREM', KEYS[2], ARGV[1])
  redis.call('HDEL', KEYS[3], ARGV[1])
  for i = 4, #ARGV do
    redis.call('ZADD', KEYS[5], 'NX', tonumber(ARGV[3]), ARGV[i])
  end
  return 1
end
return 0
"""
"""The final record, its attempt, the job's leaving the pending and failing sets, and its deliveries to
trackers falling due, in one step: no reader ever sees a final result without its attempt, and no
final result exists without its deliveries (:mod:`assayer.deliveries`)."""


def record(conn: Any, results_dir: Path, rec: ResultRecord, report_to: Sequence[str] = ()) -> bool:
    """Store one attempt. Returns False when ``rec`` is final but its job already had a final result.

    A final ``ok`` result falls due for delivery to each tracker in ``report_to`` in the same step.
    """
    line = dump(rec)
    stored = True
    if rec.get("final"):
        sinks = report_to if rec.get("status") == "ok" else ()
        due = [f"{rec['watch']}|{sink}|{rec['job_id']}" for sink in sinks]  # deliveries.Item.member
        stored = bool(conn.eval(_RECORD_FINAL, 5, keys.results(rec["watch"]), keys.pending(rec["watch"]),
                                keys.failing(rec["watch"]), keys.attempts(rec["job_id"]), keys.DELIVER_DUE,
                                rec["job_id"], line, time.time(), *due))
        if not stored:
            log.warning("job %s already has a final result; discarding this late attempt", rec["job_id"])
            return False
    else:
        with conn.pipeline() as pipe:  # MULTI: the attempt and the failing mark land together
            pipe.rpush(keys.attempts(rec["job_id"]), line)
            if rec.get("status") == "failed":  # shown at once in status and results, until a final result
                pipe.hset(keys.failing(rec["watch"]), rec["job_id"], line)
            pipe.execute()
    copy(conn, results_dir, rec["watch"], line)
    return stored


def copy(conn: Any, results_dir: Path, watch: str, line: str | None = None) -> bool:
    """Append ``line`` (and any backlog before it) to the watch's file; never raise. True when caught up."""
    if line is not None:
        if not conn.exists(keys.copy_backlog(watch)):
            try:
                _append(results_dir, watch, [line])
                return True
            except OSError as exc:
                _fell_behind(conn, results_dir, watch, exc)
        conn.rpush(keys.copy_backlog(watch), line)
    return catch_up(conn, results_dir, watch)


def catch_up(conn: Any, results_dir: Path, watch: str) -> bool:
    """Write a watch's backlog to its file, oldest first; True once nothing is left."""
    backlog = keys.copy_backlog(watch)
    lock = keys.copy_lock(watch)
    if not conn.set(lock, "1", nx=True, px=int(defaults.COPY_LOCK_TTL * 1000)):
        return False  # another worker is catching up this watch
    try:
        while True:
            lines = [raw.decode() for raw in conn.lrange(backlog, 0, 99)]
            if not lines:
                conn.hdel(keys.COPY_ERRORS, watch)
                return True
            try:
                _append(results_dir, watch, lines)
            except OSError as exc:
                _fell_behind(conn, results_dir, watch, exc)
                return False
            conn.ltrim(backlog, len(lines), -1)
    finally:
        conn.delete(lock)


def catch_up_all(conn: Any, results_dir: Path) -> None:
    """Try every watch whose copy is behind (eval workers call this every few seconds)."""
    for raw in conn.hkeys(keys.COPY_ERRORS):
        catch_up(conn, results_dir, raw.decode())


def _fell_behind(conn: Any, results_dir: Path, watch: str, exc: OSError) -> None:
    why = f"cannot write {results_dir / (watch + '.jsonl')}: {exc.strerror or exc}"
    if conn.hget(keys.COPY_ERRORS, watch) != why.encode():
        log.warning("results copy of watch %s is behind (%s); Redis keeps every result, the file catches up later",
                    watch, why)
        conn.hset(keys.COPY_ERRORS, watch, why)


def _append(results_dir: Path, watch: str, lines: list[str]) -> None:
    results_dir.mkdir(parents=True, exist_ok=True)
    with open(results_dir / f"{watch}.jsonl", "a", encoding="utf-8") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)  # several eval workers may share the directory
        fh.write("".join(line + "\n" for line in lines))
        fh.flush()
        os.fsync(fh.fileno())


def export(conn: Any, results_dir: Path, watch: str) -> int:
    """Rebuild a watch's results file from Redis (every attempt of every job it has); return the line count."""
    job_ids = {raw.decode() for raw in conn.hkeys(keys.results(watch))} | {
        raw.decode() for raw in conn.smembers(keys.pending(watch))}
    lines = []
    for job_id in job_ids:
        lines += [raw.decode() for raw in conn.lrange(keys.attempts(job_id), 0, -1)]
    lines.sort(key=lambda line: json.loads(line).get("finished_at") or "")
    results_dir.mkdir(parents=True, exist_ok=True)
    target = results_dir / f"{watch}.jsonl"
    tmp = target.with_name(f".{target.name}.export")
    tmp.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    os.replace(tmp, target)
    conn.delete(keys.copy_backlog(watch))
    conn.hdel(keys.COPY_ERRORS, watch)
    return len(lines)


def has_final(conn: Any, watch: str, job_id: str) -> bool:
    return bool(conn.hexists(keys.results(watch), job_id))


def load(conn: Any, watch_names: Iterable[str], retrying: bool = True) -> list[ResultRecord]:
    """Final records of these watches, from Redis, and (``retrying``) the last failed attempt of jobs awaiting a retry."""
    out: list[ResultRecord] = []
    for name in watch_names:
        out.extend(parse(v) for v in conn.hvals(keys.results(name)))
        if retrying:
            for raw in conn.hvals(keys.failing(name)):
                rec = parse(raw)
                rec["status"] = f"retrying {rec.get('attempt', 1) + 1}/{rec.get('attempts_allowed') or '?'}"
                out.append(rec)
    return sort_records(out)


def for_checkpoint(conn: Any, watch: str, relpath: str) -> list[ResultRecord]:
    """Every attempt stored for one checkpoint path of a watch (all its versions), oldest first."""
    job_ids: set[str | None] = {parse(v).get("job_id") for v in conn.hvals(keys.results(watch))} | {
        k.decode() for k in conn.hkeys(keys.failing(watch))} | {k.decode() for k in conn.smembers(keys.pending(watch))}
    entry = conn.hget(keys.ledger(watch), relpath)
    if entry:
        job_ids.update(LedgerEntry.from_json(entry).jobs())
    out = []
    for job_id in job_ids - {None}:
        for raw in conn.lrange(keys.attempts(str(job_id)), 0, -1):
            rec = parse(raw)
            if rec.get("relpath") == relpath:
                out.append(rec)
    return sorted(out, key=lambda r: str(r.get("started_at") or ""))


def load_files(results_dir: Path, watch: str | None = None) -> list[ResultRecord]:
    """Final records from the JSON-lines files (when Redis was lost)."""
    paths = [results_dir / f"{watch}.jsonl"] if watch else sorted(results_dir.glob("*.jsonl"))
    final: dict[str, ResultRecord] = {}
    for path in paths:
        if not path.exists():
            continue
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                rec = parse(line)
            except ValueError:
                continue  # a torn last line after a crash
            if rec.get("final"):
                final.setdefault(rec["job_id"], rec)
    return sort_records(list(final.values()))


def sort_records(records: list[ResultRecord]) -> list[ResultRecord]:
    return sorted(records, key=lambda r: (r["watch"], r.get("step") is None, r.get("step") or 0, r.get("finished_at") or ""))


def best(records: list[ResultRecord], metric: str, given: str | None = None) -> tuple[dict[str, ResultRecord], Direction]:
    """The best ok record per watch by ``metric``, and the direction used; raise ValueError if no record has it."""
    rule = direction(metric, records, given)
    mode = rule.mode
    chosen: dict[str, ResultRecord] = {}
    for rec in records:
        value = (rec.get("metrics") or {}).get(metric)
        if rec.get("status") != "ok" or not isinstance(value, (int, float)) or isinstance(value, bool):
            continue
        current = chosen.get(rec["watch"])
        if current is None or (value > current["metrics"][metric] if mode == "max" else value < current["metrics"][metric]):
            chosen[rec["watch"]] = rec
    if not chosen:
        names = sorted({k for r in records for k in (r.get("metrics") or {})})
        raise ValueError(f"no ok result has a numeric metric {metric!r}; metrics present: {', '.join(names) or 'none'}")
    return chosen, rule


def qualify(records: list[ResultRecord], evaluators: dict[str, list[str]] | None = None) -> list[ResultRecord]:
    """Name each metric ``EVALUATOR.METRIC`` in the watches that have several evaluators.

    ``evaluators``: each watch's evaluator names (from its spec), so the names do not depend on
    which evaluators have results yet; the records' own evaluators are counted too. What
    ``--best``, the plot, the table and the checkpoint page use, so one rule
    (:func:`assayer.directions.direction`) sees each evaluator's metric apart.
    """
    names: dict[str, set[str]] = {w: set(n) for w, n in (evaluators or {}).items()}
    for rec in records:
        names.setdefault(rec["watch"], set()).add(evaluator_name(rec))
    out = []
    for rec in records:
        if len(names[rec["watch"]]) > 1:
            ev = evaluator_name(rec)
            rec = rec.copy()
            rec["metrics"] = {f"{ev}.{k}": v for k, v in (rec.get("metrics") or {}).items()}
            rec["directions"] = {f"{ev}.{k}": v for k, v in (rec.get("directions") or {}).items()}
        out.append(rec)
    return out


def by_checkpoint(records: list[ResultRecord]) -> list[ResultRecord]:
    """One row per checkpoint version with each evaluator's newest result merged in (``assayer results``).

    A result of an older version of an evaluator stays a row of its own, its status saying so.
    Records of watches with one evaluator come out as they went in.
    """
    groups: dict[tuple[str, str, str], list[ResultRecord]] = {}
    for rec in records:
        groups.setdefault((rec["watch"], str(rec.get("relpath")), str(rec.get("version"))), []).append(rec)
    out: list[ResultRecord] = []
    for group in groups.values():
        if len({evaluator_name(r) for r in group}) == 1 and len({r.get("evaluator_version") for r in group}) == 1:
            out.extend(group)
            continue
        newest: dict[str, ResultRecord] = {}
        for rec in sorted(group, key=lambda r: str(r.get("finished_at") or "")):
            ev = evaluator_name(rec)
            older = newest.get(ev)
            if older is not None and older.get("evaluator_version") != rec.get("evaluator_version"):
                stale = older.copy()
                stale["status"] = f"{older['status']} (old {ev} {older.get('evaluator_version')})"
                out.append(stale)
            newest[ev] = rec
        parts = list(newest.values())
        merged = parts[0].copy()
        merged["metrics"] = {k: v for r in parts for k, v in (r.get("metrics") or {}).items()}
        merged["directions"] = {k: v for r in parts for k, v in (r.get("directions") or {}).items()}
        bad = [r for r in parts if r.get("status") != "ok"]
        merged["status"] = "ok" if not bad else bad[0]["status"]
        merged["error"] = "; ".join(f"{evaluator_name(r)}: {r.get('error')}" for r in bad if r.get("error")) or None
        merged["duration"] = sum(float(r.get("duration") or 0) for r in parts)
        merged["evaluator"] = ",".join(sorted(newest))
        merged["jobs"] = [str(r["job_id"]) for r in parts]
        out.append(merged)
    return sort_records(out)


# -- formatting ----------------------------------------------------------------------------


def to_json(records: list[ResultRecord]) -> str:
    return json.dumps([{k: r.get(k) for k in FIELDS} for r in records], indent=2)


def to_csv(records: list[ResultRecord]) -> str:
    metric_names = sorted({k for r in records for k in (r.get("metrics") or {})})
    columns = [f for f in FIELDS if f != "metrics"] + metric_names
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(columns)
    for r in records:
        row = [r.get(c) for c in FIELDS if c != "metrics"] + [(r.get("metrics") or {}).get(m) for m in metric_names]
        writer.writerow(["" if v is None else v for v in row])
    return buf.getvalue()


def to_table(records: list[ResultRecord], marked: set[str] | None = None) -> str:
    if not records:
        return "no results yet"
    seen: dict[tuple[str, str], int] = {}
    for r in records:
        seen[(r["watch"], str(r.get("relpath")))] = seen.get((r["watch"], str(r.get("relpath"))), 0) + 1
    rewritten = {key for key, count in seen.items() if count > 1}
    metric_names = sorted({k for r in records for k in (r.get("metrics") or {})})
    header = ["", "watch", "step", "checkpoint", "status", *metric_names, "secs", "worker"]
    rows = []
    for r in records:
        metrics = r.get("metrics") or {}
        rows.append([
            "*" if marked and set(r.get("jobs") or [r["job_id"]]) & marked else "",
            r["watch"],
            "" if r.get("step") is None else str(r["step"]),
            _short(_shown_path(r, (r["watch"], str(r.get("relpath"))) in rewritten), 48),
            r["status"] if r["status"] == "ok" else f"{r['status']}: {_head(r.get('error') or '', 60)}",
            *[_fmt(metrics.get(m)) for m in metric_names],
            f"{r.get('duration') or 0:.2f}",
            r.get("worker") or "",
        ])
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    lines = ["  ".join(str(x).ljust(w) for x, w in zip(row, widths)).rstrip() for row in [header, *rows]]
    return "\n".join(lines)


def tracebacks(records: list[ResultRecord]) -> str:
    """Each record as a block: what, when, the outcome, and the whole error and traceback."""
    blocks = []
    for r in records:
        head = (f"{r.get('watch')}: {r.get('relpath') or r.get('checkpoint')}  step {r.get('step')}  "
                f"attempt {r.get('attempt')}/{r.get('attempts_allowed') or '?'}  {r.get('status')}"
                f"{'' if r.get('final', True) else ' (not final)'}")
        lines = [head, f"  version {r.get('version')}  worker {r.get('worker')}  started {r.get('started_at')}  "
                       f"{r.get('duration') or 0:.2f}s"]
        if r.get("status") == "ok":
            lines.append(f"  metrics: {json.dumps(r.get('metrics'), sort_keys=True)}")
        if r.get("error"):
            lines.append(f"  error: {r['error']}")
        if r.get("traceback"):
            lines.append("  " + str(r["traceback"]).rstrip().replace("\n", "\n  "))
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def _shown_path(rec: ResultRecord, rewritten: bool) -> str:
    """The checkpoint relative to its watch's directory, with its version's time when it was rewritten in place."""
    path = str(rec.get("relpath") or rec.get("checkpoint") or "")
    when = rec.get("checkpoint_time")
    return f"{path} @{str(when)[11:19]}" if when and rewritten else path


def _head(text: str, width: int) -> str:
    """An error's first line, cut at its end (its start names the exception)."""
    line = text.strip().splitlines()[0] if text.strip() else ""
    return line if len(line) <= width else line[: width - 3] + "..."


def _short(text: str, width: int) -> str:
    text = text.replace("\n", " ")
    return text if len(text) <= width else "..." + text[-(width - 3):]
