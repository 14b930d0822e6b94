"""Watch specs: what directory to watch, with which evaluator. They live in Redis so every worker sees them."""

from __future__ import annotations

import json
import logging
import os
import re
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import redis
import yaml

from . import backup, defaults, evaluator, keys, pools
from .errors import AssayerError, ConfigError, WatchError
from .filters import compile_filter
from .layouts import LAYOUTS
from .records import LedgerEntry
from .scan import Scanner
from .settings import Settings

log = logging.getLogger("assayer.watches")

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")
"""Watch names; always used with ``fullmatch`` (``$`` would let a trailing newline through)."""


ORDERS = ("newest", "oldest")


@dataclass(frozen=True)
class Evaluator:
    """One evaluation a watch runs on each checkpoint: its name in the watch, reference and pool."""

    name: str
    ref: str
    pool: str = "default"

    @classmethod
    def parse(cls, text: str) -> Evaluator:
        """``[NAME=]REF``; a bare REF is named after its function."""
        name, sep, ref = text.partition("=")
        if not sep or not NAME_RE.fullmatch(name.strip()):
            name, ref = "", text
        ref = ref.strip()
        return cls(name.strip() or evaluator.parse_ref(ref).func, ref)


@dataclass
class WatchSpec:
    name: str
    directory: str
    evaluator: str  # the first evaluator's reference (what readers of a one-evaluator watch show)
    regex: str = defaults.CHECKPOINT_REGEX
    eval_existing: bool = False
    poll_interval: float | None = None
    settle: float | None = None
    layout: str = "auto"
    ready_markers: list[str] = field(default_factory=list)
    follow_symlinks: bool = False
    report_to: list[str] = field(default_factory=list)  # trackers each final ok result is delivered to
    tensorboard_dir: str | None = None
    mlflow_run_id: str | None = None
    wandb_run_id: str | None = None
    evaluators: list[Evaluator] = field(default_factory=list)  # every evaluation of each checkpoint, in order
    backfill: bool = True  # evaluate older checkpoints when an evaluator is added or its version changes
    order: str = "newest"  # which checkpoints go first: newest or oldest
    every: int | None = None  # evaluate only steps that are multiples of this (and always the newest)
    snapshot: str = "off"  # pin each checkpoint before queueing it: off, link, copy or auto (assayer.snapshots)
    snapshot_dir: str | None = None  # None: ASSAYER_SNAPSHOT_DIR
    when_full: str = "wait"  # the snapshot cache is full: wait for room, or skip the checkpoint
    paused: bool = False
    created_at: float = field(default_factory=time.time)

    def __post_init__(self) -> None:
        if not self.evaluators:  # a spec from before several evaluators: its one evaluator
            self.evaluators = [Evaluator(evaluator.parse_ref(self.evaluator).func, self.evaluator)]
        self.evaluator = self.evaluators[0].ref

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, raw: str | bytes) -> WatchSpec:
        data = json.loads(raw)
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        values["evaluators"] = [Evaluator(**e) for e in values.get("evaluators") or []]
        return cls(**values)

    @property
    def first(self) -> str:
        """The first evaluator's name: owner of ledger entries written before evaluators had names."""
        return self.evaluators[0].name

    def shown_evaluators(self) -> str:
        """``ref`` for a watch of one default-pool evaluator; ``name=ref@pool, ...`` otherwise."""
        if len(self.evaluators) == 1 and self.evaluators[0].pool == pools.DEFAULT:
            return self.evaluator
        return ", ".join(f"{e.name}={e.ref}" + ("" if e.pool == pools.DEFAULT else f"@{e.pool}")
                         for e in self.evaluators)

    def evaluator_named(self, name: str) -> Evaluator:
        for ev in self.evaluators:
            if ev.name == name:
                return ev
        raise WatchError(f"watch {self.name} has no evaluator {name!r}",
                         f"its evaluators: {', '.join(e.name for e in self.evaluators)}")

    def same_target(self, other: WatchSpec) -> bool:
        """True when ``other`` watches the same thing the same way (ignoring what it runs and where results go)."""
        skip = {"paused", "created_at", "eval_existing", "report_to", "tensorboard_dir", "mlflow_run_id",
                "wandb_run_id", "evaluator", "evaluators", "backfill", "order", "every", "snapshot", "snapshot_dir",
                "when_full"}
        return all(getattr(self, f.name) == getattr(other, f.name) for f in fields(self) if f.name not in skip)

    def reporting(self) -> tuple[Any, ...]:
        """What may change on a running watch: where results go and what it evaluates."""
        return (self.report_to, self.tensorboard_dir, self.mlflow_run_id, self.wandb_run_id, self.evaluators,
                self.backfill, self.order, self.every, self.snapshot, self.snapshot_dir, self.when_full)

    def scanner(self, settings: Settings) -> Scanner:
        """A scanner of this watch's directory with its filter, layout and settle time."""
        return Scanner(self.directory, self.regex, self.settle if self.settle is not None else settings.settle,
                       full_scan_interval=settings.full_scan_interval, layout=self.layout, markers=self.ready_markers,
                       follow_symlinks=self.follow_symlinks, stall_after=settings.stall_after)


def default_name(directory: str) -> str:
    base = os.path.basename(os.path.normpath(directory)) or "root"
    return re.sub(r"[^A-Za-z0-9_.-]", "-", base).lstrip("._-") or "watch"


def build_spec(
    directory: str,
    evaluator_ref: str | Sequence[str],
    name: str | None = None,
    regex: str | None = None,
    eval_existing: bool = False,
    poll_interval: float | None = None,
    settle: float | None = None,
    import_evaluator: bool = True,
    layout: str | None = None,
    ready_markers: list[str] | tuple[str, ...] = (),
    evaluator_paths: tuple[str, ...] = (),
    follow_symlinks: bool = False,
    report: Report | None = None,
    suite: Suite | None = None,
    snapshot: Snapshot | None = None,
) -> tuple[WatchSpec, list[str]]:
    """Check every part of a watch and return it with warnings; raise on the first bad part.

    ``evaluator_ref`` is one ``[NAME=]REF`` or several. ``import_evaluator`` imports each evaluator
    (``watch add`` does, in the CLI process); watches from a file are only checked for the
    evaluator file's presence, so a watch worker never imports (and never initialises CUDA for) one.
    """
    warnings: list[str] = []
    directory = os.path.abspath(os.path.expanduser(directory))
    name = name or default_name(directory)
    if not NAME_RE.fullmatch(name):
        raise WatchError(
            f"watch name {name!r} is not valid", "use letters, digits, '.', '_' and '-' (at most 100), e.g. --name run1"
        )
    regex = regex or defaults.CHECKPOINT_REGEX
    compile_filter(regex)
    layout, markers = _check_layout(layout, ready_markers)
    for label, value in (("poll interval", poll_interval), ("settle", settle)):
        if (value is not None and value < 0) or (label == "poll interval" and value == 0):
            raise WatchError(f"{label} must be positive, got {value}", f"give --{label.replace(' ', '-')} in seconds")
    if os.path.exists(directory):
        if not os.path.isdir(directory):
            raise WatchError(f"{directory} is not a directory", "watch the directory that holds the checkpoints")
        if not os.access(directory, os.R_OK | os.X_OK):
            raise WatchError(f"{directory} is not readable by this user", "fix its permissions or mount it readable")
    else:
        warnings.append(f"{directory} does not exist yet; it will be watched once training creates it")
    suite = suite or Suite()
    evaluators = suite.evaluators([evaluator_ref] if isinstance(evaluator_ref, str) else list(evaluator_ref))
    checked = []
    for ev in evaluators:
        evaluator.check_allowed(evaluator.parse_ref(ev.ref), evaluator_paths)
        if import_evaluator:
            ref = evaluator.validate(ev.ref)
        else:
            parsed = evaluator.parse_ref(ev.ref)
            if parsed.file and not os.path.isfile(parsed.file):
                raise WatchError(f"evaluator file {parsed.file} does not exist", "mount the evaluators directory")
            ref = str(parsed)
        checked.append(Evaluator(ev.name, ref, ev.pool))
    spec = WatchSpec(name, directory, checked[0].ref, regex, eval_existing, poll_interval, settle, layout, markers,
                     bool(follow_symlinks), evaluators=checked, backfill=suite.backfill, order=suite.order,
                     every=suite.every)
    if snapshot is not None:
        spec.snapshot, spec.snapshot_dir, spec.when_full = snapshot.check()
    if report is not None:
        spec.report_to, spec.tensorboard_dir = report.check(), report.tensorboard_dir
        spec.mlflow_run_id, spec.wandb_run_id = report.mlflow_run_id, report.wandb_run_id
    return spec, warnings


@dataclass(frozen=True)
class Snapshot:
    """``--snapshot``, ``--snapshot-dir`` and ``--when-full`` (see :mod:`assayer.snapshots`)."""

    mode: str = "off"
    directory: str | None = None
    when_full: str = "wait"

    def check(self) -> tuple[str, str | None, str]:
        if self.mode not in ("off", "link", "copy", "auto"):
            raise WatchError(f"--snapshot {self.mode!r} is not a snapshot mode", "use off, link, copy or auto")
        if self.when_full not in ("wait", "skip"):
            raise WatchError(f"--when-full {self.when_full!r} is not known", "use wait or skip")
        folder = os.path.abspath(os.path.expanduser(self.directory)) if self.directory else None
        if folder and os.path.exists(folder) and not os.access(folder, os.W_OK | os.X_OK):
            raise WatchError(f"snapshot directory {folder} is not writable by this user",
                             "give a writable --snapshot-dir (a separate volume: the checkpoints stay read-only)")
        return self.mode, folder, self.when_full


@dataclass(frozen=True)
class Suite:
    """How a watch's evaluations are run: ``--pool``, ``--no-backfill``, ``--order`` and ``--every``."""

    pools: str | Sequence[str] | dict[str, str] = ()  # "POOL" for all, or "NAME=POOL" each (or a mapping)
    backfill: bool = True
    order: str = "newest"
    every: int | None = None

    def evaluators(self, texts: Sequence[str]) -> list[Evaluator]:
        """Parse ``[NAME=]REF`` items, give each its pool, and refuse duplicates and unknown names."""
        if not texts:
            raise WatchError("a watch needs at least one evaluator", "give -e path/to/file.py:fn (repeatable)")
        evaluators = [Evaluator.parse(t) for t in texts]
        names = [e.name for e in evaluators]
        for ev in evaluators:
            if not NAME_RE.fullmatch(ev.name):
                raise WatchError(f"evaluator name {ev.name!r} is not valid",
                                 "use -e NAME=REF with letters, digits, '.', '_', '-'")
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise WatchError(f"two evaluators are named {', '.join(dupes)}",
                             "name each one: -e loss=eval.py:run -e acc=eval.py:run")
        if self.order not in ORDERS:
            raise WatchError(f"order {self.order!r} is not known", f"use one of: {', '.join(ORDERS)}")
        if self.every is not None and (isinstance(self.every, bool) or not isinstance(self.every, int) or self.every < 1):
            raise WatchError(f"--every must be a whole number of steps >= 1, got {self.every!r}", "e.g. --every 1000")
        chosen: dict[str, str] = {}
        items = self.pools.items() if isinstance(self.pools, dict) else [
            (p.partition("=")[0], p.partition("=")[2]) if "=" in p else ("", p)
            for p in ([self.pools] if isinstance(self.pools, str) else self.pools)]
        for ev_name, pool in items:
            pool_name = pools.check(str(pool).strip())
            if ev_name and ev_name not in names:
                raise WatchError(f"--pool {ev_name}={pool_name}: no evaluator is named {ev_name!r}",
                                 f"evaluators of this watch: {', '.join(names)}")
            for target in [ev_name] if ev_name else names:
                chosen[target] = pool_name
        return [Evaluator(e.name, e.ref, chosen.get(e.name, pools.DEFAULT)) for e in evaluators]


@dataclass(frozen=True)
class Report:
    """Where a watch's results go beside Redis: ``--report-to`` and each tracker's per-watch option."""

    to: str | list[str] | tuple[str, ...] = ()
    tensorboard_dir: str | None = None
    mlflow_run_id: str | None = None
    wandb_run_id: str | None = None

    def check(self) -> list[str]:
        from .sinks import parse_report_to

        names = parse_report_to(self.to if isinstance(self.to, str) else ",".join(self.to))
        for option, sink in (("tensorboard_dir", "tensorboard"), ("mlflow_run_id", "mlflow"), ("wandb_run_id", "wandb")):
            if getattr(self, option) and sink not in names:
                raise WatchError(f"--{option.replace('_', '-')} is given but {sink} is not in --report-to",
                                 f"add {sink} to --report-to (e.g. --report-to {sink})")
        return names


MARKER_RE = re.compile(r"[A-Za-z0-9_.-]{1,100}")


def _check_layout(layout: str | None, markers: list[str] | tuple[str, ...]) -> tuple[str, list[str]]:
    layout = layout or "auto"
    if layout not in LAYOUTS:
        raise WatchError(f"layout {layout!r} is not known", f"use one of: {', '.join(LAYOUTS)}")
    if isinstance(markers, str):
        markers = [markers]
    for marker in markers:
        if not isinstance(marker, str) or not MARKER_RE.fullmatch(marker) or marker in (".", ".."):
            raise WatchError(f"ready marker {marker!r} is not a file name",
                             "give the name of the file your trainer writes last, e.g. --ready-marker COMMITTED")
    if markers and layout not in ("auto", "marker"):
        raise WatchError(f"--ready-marker has no effect with --layout {layout}",
                         "drop --layout (auto) or use --layout marker")
    return layout, list(dict.fromkeys(markers))


def load_file(path: Path) -> list[dict[str, Any]]:
    """Read a watches file: ``{watches: [{name, directory, evaluator, ...}, ...]}``."""
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except OSError as exc:
        raise ConfigError(f"watches file {path} cannot be read: {exc.strerror}", "check ASSAYER_WATCHES_FILE") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"watches file {path} is not valid YAML: {exc}", "fix the file") from None
    entries = data.get("watches") if isinstance(data, dict) else None
    if entries is None:
        return []
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise ConfigError(f"watches file {path}: 'watches' must be a list of mappings", "see README, Watches file")
    allowed = {"name", "directory", "evaluator", "evaluators", "pools", "backfill", "order", "every", "snapshot",
               "snapshot_dir", "when_full", "regex",
               "eval_existing", "poll_interval", "settle", "layout", "ready_markers", "follow_symlinks", "report_to",
               "tensorboard_dir", "mlflow_run_id", "wandb_run_id"}
    for entry in entries:
        unknown = set(entry) - allowed
        if unknown:
            raise ConfigError(
                f"watches file {path}: unknown key(s) {sorted(unknown)} in {entry.get('name', entry)}",
                f"allowed keys: {sorted(allowed)}",
            )
        if "directory" not in entry or not (entry.get("evaluator") or entry.get("evaluators")):
            raise ConfigError(f"watches file {path}: each watch needs directory and evaluator (or evaluators)",
                              "add them")
    return entries


def _file_evaluators(entry: dict[str, Any]) -> tuple[list[str], dict[str, str]]:
    """A watches-file entry's evaluators as ``NAME=REF`` items, and the pools its mappings name.

    ``evaluators`` is a list of ``[NAME=]REF`` strings or ``{name, ref, pool}`` mappings;
    ``evaluator`` (one reference) is the older spelling.
    """
    items = entry.get("evaluators") or [entry["evaluator"]]
    if not isinstance(items, list):
        items = [items]
    texts, chosen = [], {}
    for item in items:
        if isinstance(item, dict):
            if not item.get("ref"):
                raise ConfigError(f"evaluator {item} in watch {entry.get('name', entry)} has no ref",
                                  "give {name: ..., ref: path/to/file.py:fn, pool: ...}")
            ev = Evaluator.parse(f"{item['name']}={item['ref']}" if item.get("name") else str(item["ref"]))
            texts.append(f"{ev.name}={ev.ref}")
            if item.get("pool"):
                chosen[ev.name] = str(item["pool"])
        else:
            texts.append(str(item))
    pools_given = entry.get("pools") or {}
    if isinstance(pools_given, str):
        pools_given = {Evaluator.parse(t).name: pools_given for t in texts}
    if not isinstance(pools_given, dict):
        raise ConfigError(f"pools of watch {entry.get('name', entry)} must map evaluator names to pools",
                          "e.g. pools: {mmlu: gpu}")
    return texts, {**{str(k): str(v) for k, v in pools_given.items()}, **chosen}


# -- the store ----------------------------------------------------------------
#
# Registering a watch and taking its baseline happen in one WATCH/MULTI transaction on the
# watches hash: two `watch add` (or a watches file read by two workers) never register twice,
# and a failure leaves nothing half-registered.


def register(conn: redis.Redis, settings: Settings, spec: WatchSpec) -> str:
    """Store a new watch, with the checkpoints already there as its baseline unless ``eval_existing``.

    Returns ``"added"``, ``"updated"`` (same target, new trackers) or ``"unchanged"``; one transaction, so a
    failure leaves nothing half-registered.
    """
    existing_raw = conn.hget(keys.WATCHES, spec.name)
    if existing_raw:
        existing = WatchSpec.from_json(existing_raw)
        if existing.same_target(spec):
            if existing.reporting() == spec.reporting():
                return "unchanged"
            spec.created_at, spec.paused = existing.created_at, existing.paused
            update(conn, spec)  # only where results go changed: past results stay as delivered (see `assayer report`)
            return "updated"
        raise WatchError(
            f"a watch named {spec.name!r} already watches {existing.directory} (regex, layout and options as given "
            "then)", f"pick another --name, or `assayer watch remove {spec.name}` first",
        )
    backup.refuse_baseline_if_lost(conn, settings.results_path, spec.name)
    baseline: dict[str, str] = {}
    if not spec.eval_existing:
        scanner = spec.scanner(settings)
        baseline = {c.relpath: c.version for c in scanner.scan(time.time()).ready}
    with conn.pipeline() as pipe:
        pipe.watch(keys.WATCHES)
        if pipe.hexists(keys.WATCHES, spec.name):
            pipe.unwatch()
            return register(conn, settings, spec)
        pipe.multi()
        pipe.hset(keys.WATCHES, spec.name, spec.to_json())
        for relpath, version in baseline.items():
            pipe.hset(keys.ledger(spec.name), relpath, LedgerEntry(version, None, time.time()).to_json())
        if not spec.paused:
            pipe.zadd(keys.DUE, {spec.name: 0})
        try:
            pipe.execute()
        except redis.WatchError:
            return register(conn, settings, spec)
    log.info("watch %s added on %s (%d existing checkpoints as baseline)", spec.name, spec.directory, len(baseline))
    return "added"


def baseline_size(conn: Any, watch: str) -> int:
    """Checkpoints taken as already there when the watch was added (ledgered without a job)."""
    return sum(1 for raw in conn.hvals(keys.ledger(watch)) if LedgerEntry.from_json(raw).is_baseline)


def update(conn: Any, spec: WatchSpec) -> None:
    """Replace a watch's spec (from a watches file), keeping its ledger."""
    with conn.pipeline() as pipe:
        pipe.hset(keys.WATCHES, spec.name, spec.to_json())
        if spec.paused:
            pipe.zrem(keys.DUE, spec.name)
        else:
            pipe.zadd(keys.DUE, {spec.name: 0})
        pipe.execute()


def sync_file(conn: redis.Redis, settings: Settings) -> None:
    """Register the watches declared in ``settings.watches_file``; a bad entry is logged, the rest still load."""
    assert settings.watches_file is not None
    for entry in load_file(settings.watches_file):
        try:
            texts, chosen = _file_evaluators(entry)
            spec, warnings = build_spec(
                entry["directory"], texts, name=entry.get("name"), regex=entry.get("regex"),
                eval_existing=bool(entry.get("eval_existing", False)), poll_interval=entry.get("poll_interval"),
                settle=entry.get("settle"), import_evaluator=False, layout=entry.get("layout"),
                ready_markers=entry.get("ready_markers") or (), evaluator_paths=settings.evaluator_paths,
                follow_symlinks=bool(entry.get("follow_symlinks", False)),
                report=Report(entry.get("report_to", settings.report_to), entry.get("tensorboard_dir"),
                              entry.get("mlflow_run_id"), entry.get("wandb_run_id")),
                suite=Suite(chosen, bool(entry.get("backfill", True)), entry.get("order") or "newest",
                            entry.get("every")),
                snapshot=Snapshot(entry.get("snapshot") or settings.snapshot, entry.get("snapshot_dir"),
                                  entry.get("when_full") or "wait"),
            )
            for warning in warnings:
                log.warning("watch %s: %s", spec.name, warning)
            current = get(conn, spec.name)
            if current is None:
                register(conn, settings, spec)
            elif not current.same_target(spec) or current.reporting() != spec.reporting():
                spec.created_at, spec.paused = current.created_at, current.paused
                update(conn, spec)
                log.info("watch %s updated from %s", spec.name, settings.watches_file)
        except AssayerError as exc:
            log.error("watches file %s: skipping %s: %s", settings.watches_file, entry.get("name", entry), exc)



def get(conn: Any, name: str) -> WatchSpec | None:
    raw = conn.hget(keys.WATCHES, name)
    return WatchSpec.from_json(raw) if raw else None


def require(conn: Any, name: str) -> WatchSpec:
    spec = get(conn, name)
    if spec is None:
        names = sorted(n.decode() for n in conn.hkeys(keys.WATCHES))
        raise WatchError(f"no watch named {name!r}", f"existing watches: {', '.join(names) or 'none'}")
    return spec


def all_specs(conn: Any) -> list[WatchSpec]:
    return sorted((WatchSpec.from_json(v) for v in conn.hvals(keys.WATCHES)), key=lambda s: s.name)


def set_paused(conn: Any, name: str, paused: bool) -> WatchSpec:
    spec = require(conn, name)
    spec.paused = paused
    with conn.pipeline() as pipe:
        pipe.hset(keys.WATCHES, name, spec.to_json())
        if paused:
            pipe.zrem(keys.DUE, name)
        else:
            pipe.zadd(keys.DUE, {name: 0})
        pipe.execute()
    return spec


def remove(conn: Any, name: str) -> None:
    """Forget the watch and its ledger; results stay."""
    require(conn, name)
    conn.delete(keys.ledger(name), keys.pending(name), keys.watch_state(name))
    with conn.pipeline() as pipe:
        pipe.hdel(keys.WATCHES, name)
        pipe.zrem(keys.DUE, name)
        pipe.execute()
