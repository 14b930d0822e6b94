"""Evaluation results: every attempt kept in Redis and in an append-only JSON-lines file per watch.

The file copy lets results survive the loss of Redis (``assayer results --source files``).
Exactly one *final* record exists per eval job: it is written with HSETNX, so a stale worker
that finishes after its job was taken over cannot add a second one.

Redis is the record; the file is a copy, and the copy holds every line exactly once:

* **Never lost.** A line enters the watch's copy backlog (:func:`assayer.keys.copy_backlog`) in the
  same Redis step that stores its record, and the watch enters :data:`assayer.keys.COPY_PENDING`
  with it. It leaves the backlog only after it was appended and fsync'ed. A process killed between
  the two steps leaves the line in the backlog, and eval workers drain every watch in that set
  every few seconds (:func:`catch_up_all`). A full or unwritable results directory never fails an
  evaluation either: the lines wait, ``assayer status`` shows why, and the copy catches up in
  order once the directory is writable again.
* **Never twice.** The backlog is drained under the watch's copy lock (``flock`` of a lock file beside
  the results file, :func:`lock_path`; the kernel drops it with a killed holder, so nobody waits on
  a dead one). A drainer killed after its append and before its trim leaves the file *ending* with
  the lines still at the head of the backlog; the next drainer, under the same lock, sees that and
  appends only the rest. The append is idempotent rather than the readers tolerant: the file holds
  each attempt once, so every reader (:func:`load_files`, ``assayer restore``, anyone counting lines
  or attempts) can take it as it is. Each line is one attempt's record (its job, attempt and times),
  so an identical line is the same record. A trim takes effect only while the backlog still starts
  with the line appended first, and a line torn by a crash or a full disk is cut off before the next
  append (readers skip such a line anyway).
* **Cheap.** Storing an attempt costs three round trips (the Redis step, taking the batch, trimming
  it) where it cost two (the Redis step, a look at the backlog); the fsync was always there.

``assayer results --export`` rebuilds the files from Redis at any time.
"""

from __future__ import annotations

import contextlib
import csv
import fcntl
import io
import json
import logging
import os
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any

from . import defaults, keys
from .directions import Direction, direction
from .records import FIELDS, LedgerEntry, ResultRecord, dump, evaluator_name, parse

log = logging.getLogger("assayer.results")


_RECORD_FINAL = """
if redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2]) == 1 then
  redis.call('RPUSH', KEYS[4], ARGV[2])
  redis.call('SREM', KEYS[2], ARGV[1])
  redis.call('HDEL', KEYS[3], ARGV[1])
  redis.call('RPUSH', KEYS[6], ARGV[2])
  redis.call('SADD', KEYS[7], ARGV[4])
  for i = 5, #ARGV do
    redis.call('ZADD', KEYS[5], 'NX', tonumber(ARGV[3]), ARGV[i])
  end
  return 1
end
return 0
"""
"""The final record, its attempt, the job's leaving the pending and failing sets, its line waiting for the
results file, and its deliveries to trackers falling due, in one step: no reader ever sees a final result
without its attempt, and no final result exists without its file line and its deliveries
(:mod:`assayer.deliveries`)."""

_RECORD_ATTEMPT = """
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 1 then
  return 0
end
for _, stored in ipairs(redis.call('LRANGE', KEYS[2], 0, -1)) do
  if cjson.decode(stored)['attempt'] == tonumber(ARGV[5]) then
    return 2
  end
end
redis.call('RPUSH', KEYS[2], ARGV[2])
if ARGV[3] == 'failed' then
  redis.call('HSET', KEYS[3], ARGV[1], ARGV[2])
end
redis.call('RPUSH', KEYS[4], ARGV[2])
redis.call('SADD', KEYS[5], ARGV[4])
return 1
"""
"""An attempt that is not final, its failing mark (shown at once in status and results, until a final result)
and its file line, in one step; never after its job's final result (a worker killed after storing that one is
found lost by the sweep, and what it did was done), and never twice: a worker killed after storing a failed
attempt but before rq's own bookkeeping of it is found lost too, and its attempt is not "lost" (returns 2)."""

_TAKE = """
local first, count = ARGV[2], tonumber(ARGV[3])
if count > 0 and redis.call('LINDEX', KEYS[1], 0) == first then
  redis.call('LTRIM', KEYS[1], count, -1)
end
local lines = redis.call('LRANGE', KEYS[1], 0, tonumber(ARGV[4]) - 1)
if #lines == 0 then
  redis.call('SREM', KEYS[2], ARGV[1])
  redis.call('HDEL', KEYS[3], ARGV[1])
end
return lines
"""
"""Trim the ``count`` lines just appended (only if the backlog still starts with the first of them), and take
the next batch; an empty backlog leaves the pending set and clears the watch's copy error, in the same step."""


def record(conn: Any, results_dir: Path, rec: ResultRecord, report_to: Sequence[str] = ()) -> bool:
    """Store one attempt. Returns False when its job already had a final result (a late attempt, final or not).

    A final ``ok`` result falls due for delivery to each tracker in ``report_to`` in the same step.
    Its line reaches the results file now, or later from the backlog; this never raises for the file.
    """
    line = dump(rec)
    watch = rec["watch"]
    stored = True
    if rec.get("final"):
        sinks = report_to if rec.get("status") == "ok" else ()
        due = [f"{watch}|{sink}|{rec['job_id']}" for sink in sinks]  # deliveries.Item.member
        stored = bool(conn.eval(_RECORD_FINAL, 7, keys.results(watch), keys.pending(watch),
                                keys.failing(watch), keys.attempts(rec["job_id"]), keys.DELIVER_DUE,
                                keys.copy_backlog(watch), keys.COPY_PENDING,
                                rec["job_id"], line, time.time(), watch, *due))
        if not stored:
            log.warning("job %s already has a final result; discarding this late attempt", rec["job_id"])
            return False
    else:
        outcome = conn.eval(_RECORD_ATTEMPT, 5, keys.results(watch), keys.attempts(rec["job_id"]),
                            keys.failing(watch), keys.copy_backlog(watch), keys.COPY_PENDING,
                            rec["job_id"], line, str(rec.get("status")), watch, int(rec["attempt"]))
        if outcome == 0:  # e.g. "the worker was lost" for a job whose worker was killed after storing its result
            log.warning("job %s already has a final result; discarding attempt %s", rec["job_id"], rec.get("attempt"))
            return False
        if outcome == 2:  # the same: killed after storing this failed attempt, before rq had scheduled its retry
            log.info("job %s: attempt %s is already recorded; not recording it again", rec["job_id"], rec["attempt"])
            return False
    catch_up(conn, results_dir, watch)
    return stored


def catch_up(conn: Any, results_dir: Path, watch: str) -> bool:
    """Append a watch's backlog to its file, oldest first, each line once; True once nothing is left.

    Never raises for the file: a failure is noted for ``assayer status`` and the lines wait.
    """
    try:
        with _locked(results_dir, watch):
            _drain(conn, results_dir, watch, [])
        return True
    except OSError as exc:
        _fell_behind(conn, results_dir, watch, exc)
        return False


def catch_up_all(conn: Any, results_dir: Path) -> None:
    """Drain every watch whose copy may be behind (eval workers call this every few seconds): lines a killed
    process left in the backlog, and lines that wait for a full or unwritable directory."""
    names = {keys.text(raw) for raw in conn.smembers(keys.COPY_PENDING)}
    for name in sorted(names | {keys.text(raw) for raw in conn.hkeys(keys.COPY_ERRORS)}):
        catch_up(conn, results_dir, name)


def lock_path(results_dir: Path, watch: str) -> Path:
    """The file whose ``flock`` serializes every write of a watch's results file (that one may be replaced)."""
    return results_dir / f".{watch}.jsonl.lock"


@contextlib.contextmanager
def _locked(results_dir: Path, watch: str) -> Iterator[None]:
    """Hold the watch's copy lock. Several eval workers (on several hosts, over NFS) share the directory; the
    kernel drops the lock of a killed holder, so nobody waits on a dead one."""
    results_dir.mkdir(parents=True, exist_ok=True)
    with open(lock_path(results_dir, watch), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _drain(conn: Any, results_dir: Path, watch: str, written: list[str]) -> None:
    """Under the lock: trim ``written`` (lines now in the file) and append the rest of the backlog, batch by batch."""
    backlog = keys.copy_backlog(watch)
    lines = [] if written else [keys.text(raw) for raw in conn.lrange(backlog, 0, defaults.COPY_BATCH - 1)]
    with open(results_dir / f"{watch}.jsonl", "a+b") as fh:
        while True:
            if lines:  # appended before the trim: a drainer killed in between leaves them at the file's end
                _append(fh, [line.encode() for line in lines])
                written = lines
            lines = [keys.text(raw) for raw in conn.eval(
                _TAKE, 3, backlog, keys.COPY_PENDING, keys.COPY_ERRORS,
                watch, written[0] if written else "", len(written), defaults.COPY_BATCH)]
            if not lines:
                return


def _fell_behind(conn: Any, results_dir: Path, watch: str, exc: OSError) -> None:
    why = f"cannot write {results_dir / (watch + '.jsonl')}: {exc.strerror or exc}"
    if conn.hget(keys.COPY_ERRORS, watch) != why.encode():
        log.warning("results copy of watch %s is behind (%s); Redis keeps every result, the file catches up later",
                    watch, why)
        conn.hset(keys.COPY_ERRORS, watch, why)


def _append(fh: IO[bytes], lines: list[bytes]) -> None:
    """Append the lines the file does not already end with (a drainer killed before its trim wrote them)."""
    size = _cut_torn_line(fh)
    window = sum(len(line) + 1 for line in lines) + 1  # the lines and the newline before them
    start = max(0, size - window)
    fh.seek(start)
    tail = fh.read(size - start).split(b"\n")[:-1]
    if start > 0:
        tail = tail[1:]  # the window's first piece may be part of a line
    done = next((n for n in range(min(len(tail), len(lines)), 0, -1) if tail[-n:] == lines[:n]), 0)
    if done < len(lines):
        fh.write(b"".join(line + b"\n" for line in lines[done:]))
        fh.flush()
        os.fsync(fh.fileno())


def _cut_torn_line(fh: IO[bytes]) -> int:
    """Cut a last line without its newline (a writer killed mid-write, a full disk); return the file's size."""
    size = os.fstat(fh.fileno()).st_size
    if size == 0:
        return 0
    fh.seek(size - 1)
    if fh.read(1) == b"\n":
        return size
    end = size
    while end > 0:  # back to the last newline, a chunk at a time (a traceback's line can be long)
        start = max(0, end - 65536)
        fh.seek(start)
        newline = fh.read(end - start).rfind(b"\n")
        end = start if newline < 0 else start + newline + 1
        if newline >= 0:
            break
    fh.truncate(end)
    log.warning("%s: cut a torn last line (%d bytes) before appending", fh.name, size - end)
    return end


def export(conn: Any, results_dir: Path, watch: str) -> int:
    """Rebuild a watch's results file from Redis (every attempt of every job it has); return the line count.

    Under the copy lock: the backlog's lines go last, in their order, so an export cut short before it
    trimmed them leaves a file that ends with them, which the next drain recognises.
    """
    with _locked(results_dir, watch):
        job_ids = {raw.decode() for raw in conn.hkeys(keys.results(watch))} | {
            raw.decode() for raw in conn.smembers(keys.pending(watch))}
        lines = []
        for job_id in job_ids:
            lines += [raw.decode() for raw in conn.lrange(keys.attempts(job_id), 0, -1)]
        waiting = [keys.text(raw) for raw in conn.lrange(keys.copy_backlog(watch), 0, -1)]
        queued = set(waiting)
        lines = sorted((line for line in lines if line not in queued),
                       key=lambda line: json.loads(line).get("finished_at") or "") + waiting
        target = results_dir / f"{watch}.jsonl"
        tmp = target.with_name(f".{target.name}.export")
        with open(tmp, "wb") as fh:
            fh.write(b"".join(line.encode() + b"\n" for line in lines))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
        _drain(conn, results_dir, watch, waiting)  # trims what the file now has, appends what came since
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
    given = evaluators or {}
    names: dict[str, set[str]] = {w: set(n) for w, n in given.items()}
    for rec in records:
        if evaluator_name(rec):  # a record without one (hand-made, or very old) is the watch's first evaluator's
            names.setdefault(rec["watch"], set()).add(evaluator_name(rec))
    out = []
    for rec in records:
        if len(names.get(rec["watch"], ())) > 1:
            ev = evaluator_name(rec) or (given.get(rec["watch"]) or ["?"])[0]
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
