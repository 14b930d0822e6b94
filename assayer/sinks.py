"""Deliver final results to the trackers people already look at: TensorBoard, MLflow and W&B.

Each numeric metric becomes ``eval/<metric>`` at the checkpoint's training step (a step of None
goes to each tool's own default: 0 in TensorBoard and MLflow, no step metric in W&B), so
evaluations that finish late or out of order still land on the right x-value.

Exactly-once rule: a delivery is recorded as done (in Redis, by the caller) only after
``deliver()`` returned, and a retry first asks the tracker itself, ``delivered()``, so a worker
killed between "logged" and "recorded" neither duplicates nor skips the point. Per sink:

* tensorboard: one event file per result, named from the result, written to a temporary name and
  renamed: ``delivered()`` is "the file exists", and a redelivery replaces it. Exactly once.
* mlflow: the metrics and a marker tag ``assayer.result.step-<step>.<digest>`` (whose value holds
  path, version and evaluator) go in one ``log_batch``. MLflow's SQL store commits metrics and tags
  separately, so a kill between the two leaves metrics without the marker; the redelivery then
  logs identical rows (same key, value, step and timestamp, the timestamp being the result's
  ``finished_at``), which the metric table's primary key drops. Exactly once with a SQL backend;
  a file-store backend (``./mlruns``) would keep the second copy in that window.
* wandb: the marker ``assayer/result`` is in the same history row as the metrics, and
  ``deliver()`` returns only once that row is in the run's local ``.wandb`` file. Offline,
  ``delivered()`` reads those files: exactly once. Online, it asks the server
  (``scan_history``); the row reaches the server asynchronously, so a process killed after the
  local flush but before the upload loses the row from the server (the retry logs it again, once),
  and a retry made while the first writer still lives may see it too early and log a second,
  identical row. Online runs are written in W&B's (experimental) shared mode, because the
  trainer may still be writing the same run. W&B cannot merge several offline directories of one
  run id: ``wandb sync`` of the later one replaces the earlier history (wandb issues #3841, #5865).
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import importlib
import json
import logging
import os
import posixpath
import re
import struct
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, ClassVar

from .errors import AssayerError, ConfigError

log = logging.getLogger("assayer.sinks")

PREFIX = "eval/"
"""Namespace of the metrics Assayer writes (``eval/accuracy``)."""

WANDB_STEP_METRIC = "train/global_step"
"""The x-axis of ``eval/*`` in W&B: the one Hugging Face's WandbCallback defines, so points line up with training."""

WANDB_FLUSH_TIMEOUT = 30.0
"""Seconds ``deliver()`` waits for W&B to write the row to the run's local file before it gives up (retryable)."""

MLFLOW_WATCH_TAG = "assayer.watch"
"""Tag that finds the run Assayer made for a watch again (when no ``mlflow_run_id`` is given)."""


class SinkUnavailable(AssayerError):
    """A tracker cannot be reached or refused for now: the delivery is worth another attempt."""

    exit_code = 3


@dataclasses.dataclass(frozen=True)
class Delivery:
    """One final result for one sink; travels as JSON in rq job payloads (``to_dict``/``from_dict``)."""

    watch: str
    sink: str
    result_key: str  # unique per result: the idempotence key
    path: str
    version: str
    step: int | None
    metrics: dict[str, Any]
    evaluator: str
    finished_at: float
    epoch: float | None = None
    tensorboard_dir: str | None = None  # per-watch options; None: the sink's default
    mlflow_run_id: str | None = None
    wandb_run_id: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Delivery:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})  # unknown keys: from a newer Assayer

    @property
    def digest(self) -> str:
        """A short, stable id of the result, safe in file names, tag keys and run ids."""
        return hashlib.sha256(self.result_key.encode()).hexdigest()[:16]

    def numeric(self) -> dict[str, float]:
        """The metrics a chart can draw: numbers only (no bools, strings, lists or dicts)."""
        return {k: float(v) for k, v in self.metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}

    def info(self) -> dict[str, Any]:
        return {"path": self.path, "version": self.version, "step": self.step, "epoch": self.epoch,
                "evaluator": self.evaluator, "result": self.digest}


def _need(module: str, extra: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ConfigError(f"the {extra} sink needs the Python package {module!r}, which is not installed",
                          hint=f"pip install 'checkpoint-assayer[{extra}]'") from exc


class Sink(ABC):
    """A tracker that results are delivered to. Callers retrying a delivery ask ``delivered()`` first."""

    name: ClassVar[str]

    @abstractmethod
    def deliver(self, d: Delivery) -> None:
        """Write the result; returns once the tracker has it (raises :class:`SinkUnavailable` to retry)."""

    @abstractmethod
    def delivered(self, d: Delivery) -> bool:
        """Ask the tracker whether this result (``d.result_key``) is already there."""

    def close(self) -> None:  # noqa: B027 - most sinks hold nothing open
        """Release connections and finish open runs."""


def deliver_once(sink: Sink, d: Delivery) -> bool:
    """Deliver unless the tracker already has the result; True when this call wrote it."""
    if sink.delivered(d):
        return False
    sink.deliver(d)
    return True


class TensorBoardSink(Sink):
    """Event files read by ``tensorboard --logdir <results_dir>/tensorboard`` (one run per watch).

    Each file starts with a ``brain.Event:2`` file version: TensorBoard then purges "orphaned" data
    only after a SessionLog START, which Assayer never writes, so out-of-order steps all stay.
    """

    name = "tensorboard"

    def __init__(self, results_dir: Path | None = None) -> None:
        _need("tensorboard", "tensorboard")
        self.results_dir = results_dir

    def directory(self, d: Delivery) -> Path:
        if d.tensorboard_dir:
            return Path(d.tensorboard_dir)
        if self.results_dir is None:
            raise ConfigError(f"watch {d.watch!r}: no TensorBoard directory", hint="set the watch's tensorboard_dir")
        return self.results_dir / "tensorboard" / d.watch

    def file(self, d: Delivery) -> Path:
        # Named by time first: TensorBoard's legacy loader reads a directory's files in name order.
        return self.directory(d) / f"events.out.tfevents.{int(d.finished_at):010d}.assayer-{d.digest}"

    def delivered(self, d: Delivery) -> bool:
        return self.file(d).exists()

    def deliver(self, d: Delivery) -> None:
        from tensorboard.compat.proto import event_pb2, summary_pb2, tensor_pb2, tensor_shape_pb2, types_pb2
        from tensorboard.summary.writer.record_writer import RecordWriter

        step = d.step if d.step is not None else 0
        values = [summary_pb2.Summary.Value(tag=PREFIX + k, simple_value=v) for k, v in d.numeric().items()]
        text = tensor_pb2.TensorProto(dtype=types_pb2.DT_STRING, tensor_shape=tensor_shape_pb2.TensorShapeProto(),
                                      string_val=[f"`{d.path}` version `{d.version}` ({d.evaluator})".encode()])
        meta = summary_pb2.SummaryMetadata(plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="text"))
        values.append(summary_pb2.Summary.Value(tag="assayer/checkpoint", metadata=meta, tensor=text))
        events = [event_pb2.Event(wall_time=d.finished_at, file_version="brain.Event:2"),
                  event_pb2.Event(wall_time=d.finished_at, step=step, summary=summary_pb2.Summary(value=values))]
        final = self.file(d)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.with_name(f".{final.name}.{os.getpid()}.tmp")  # no "tfevents" in it: readers skip it
        with open(tmp, "wb") as fh:
            writer = RecordWriter(fh)
            for event in events:
                writer.write(event.SerializeToString())
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, final)  # a redelivery replaces the file whole: one point per result
        dir_fd = os.open(final.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def _mlflow_key(metric: str) -> str:
    key = PREFIX + re.sub(r"[^\w.\- /]", "_", metric)  # what MLflow accepts in a metric name
    return key if posixpath.normpath(key) == key else PREFIX + re.sub(r"[^\w.\- ]", "_", metric)


class MlflowSink(Sink):
    """Into the run ``mlflow_run_id`` (the training run), or one run per watch, made once and tagged."""

    name = "mlflow"

    def __init__(self, tracking_uri: str | None = None, experiment: str | None = None) -> None:
        _need("mlflow", "mlflow")
        from mlflow import MlflowClient

        self.client = MlflowClient(tracking_uri)  # None: MLFLOW_TRACKING_URI, as MLflow itself resolves it
        self.experiment = experiment  # None: the watch's name
        self._runs: dict[tuple[str, str], str] = {}

    def _call(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        from mlflow.exceptions import MlflowException

        try:
            return fn(*args, **kwargs)
        except MlflowException as exc:
            status = exc.get_http_status_code()
            if status >= 500 or status == 429:  # transport errors come as INTERNAL_ERROR (500)
                raise SinkUnavailable(f"MLflow at {self.client.tracking_uri} failed to {what}: {exc.message}",
                                      hint="check the tracking server; the delivery is retried") from exc
            raise

    def _experiment_id(self, name: str) -> str:
        from mlflow.exceptions import MlflowException

        exp = self._call("find the experiment", self.client.get_experiment_by_name, name)
        if exp is None:
            try:
                return str(self._call("create the experiment", self.client.create_experiment, name))
            except MlflowException as exc:  # another worker created it first
                if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
                exp = self._call("find the experiment", self.client.get_experiment_by_name, name)
        if exp.lifecycle_stage != "active":
            raise ConfigError(f"MLflow experiment {name!r} is deleted", hint="restore it or set MLFLOW_EXPERIMENT_NAME")
        return str(exp.experiment_id)

    def _watch_runs(self, exp_id: str, watch: str) -> list[Any]:
        quoted = watch.replace("\\", "\\\\").replace("'", "\\'")
        runs = self._call("search runs", self.client.search_runs, [exp_id],
                          filter_string=f"tags.`{MLFLOW_WATCH_TAG}` = '{quoted}'",
                          order_by=["attributes.start_time ASC", "attributes.run_id ASC"])
        return list(runs)

    def run_id(self, d: Delivery, create: bool = True) -> str | None:
        if d.mlflow_run_id:
            return d.mlflow_run_id
        key = (self.experiment or d.watch, d.watch)
        if key not in self._runs:
            exp_id = self._experiment_id(key[0])
            runs = self._watch_runs(exp_id, d.watch)
            if not runs and not create:
                return None
            if not runs:
                mine = self._call("create a run", self.client.create_run, exp_id, run_name=d.watch,
                                  tags={MLFLOW_WATCH_TAG: d.watch})
                runs = self._watch_runs(exp_id, d.watch)
                # Workers that create at the same moment all keep the oldest run and delete their own.
                if runs and runs[0].info.run_id != mine.info.run_id:
                    self._call("delete a duplicate run", self.client.delete_run, mine.info.run_id)
                runs = runs or [mine]
            self._runs[key] = str(runs[0].info.run_id)
        return self._runs[key]

    @staticmethod
    def marker(d: Delivery) -> str:
        return f"assayer.result.step-{d.step}.{d.digest}"

    def delivered(self, d: Delivery) -> bool:
        from mlflow.exceptions import MlflowException

        run_id = self.run_id(d, create=False)
        if run_id is None:
            return False
        try:
            run = self._call("read the run", self.client.get_run, run_id)
        except MlflowException as exc:
            if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
                raise ConfigError(f"MLflow run {run_id!r} does not exist", hint="fix the watch's mlflow_run_id") from exc
            raise
        return self.marker(d) in run.data.tags

    def deliver(self, d: Delivery) -> None:
        from mlflow.entities import Metric, RunTag

        if self.delivered(d):
            return
        run_id = self.run_id(d)
        stamp = int(d.finished_at * 1000)  # the result's own time: a re-sent row is identical, and dropped
        step = d.step if d.step is not None else 0
        metrics = [Metric(_mlflow_key(k), v, stamp, step) for k, v in d.numeric().items()]
        tags = [RunTag(self.marker(d), json.dumps(d.info(), sort_keys=True)[:8000])]
        self._call("log the result", self.client.log_batch, run_id, metrics=metrics, tags=tags)


def _wandb_records(path: Path) -> Iterator[bytes]:
    """The records of a ``.wandb`` file: a 7-byte header, then LevelDB-log blocks of 32 KiB."""
    data = path.read_bytes()
    pos, chunks = 7, b""
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        _crc, length, kind = struct.unpack_from("<IHB", data, pos)
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if pos > len(data):  # a record still being written
            return
        if kind in (1, 2):
            chunks = b""
        chunks += chunk
        if kind in (1, 4):
            yield chunks


def _wandb_has(path: Path, marker: str) -> bool:
    pb: Any = importlib.import_module("wandb.proto.wandb_internal_pb2")
    want = json.dumps(marker)
    record = pb.Record()
    for raw in _wandb_records(path):
        if b"assayer/result" not in raw:
            continue
        record.ParseFromString(raw)
        if any(item.nested_key == ["assayer/result"] and item.value_json == want for item in record.history.item):
            return True
    return False


def wandb_run_id(watch: str) -> str:
    """The id of the run Assayer makes for a watch when none is given: readable and stable."""
    slug = re.sub(r"[^A-Za-z0-9_-]", "-", watch)[:40]
    return f"assayer-{slug}-{hashlib.sha256(watch.encode()).hexdigest()[:8]}"


class WandbSink(Sink):
    """Into run ``wandb_run_id`` (the training run) or a run per watch; runs stay open until ``close()``."""

    name = "wandb"

    def __init__(self, project: str | None = None, entity: str | None = None, mode: str | None = None,
                 directory: Path | None = None, flush_timeout: float = WANDB_FLUSH_TIMEOUT) -> None:
        _need("wandb", "wandb")
        self.project, self.entity = project, entity
        self.mode = {"dryrun": "offline", "run": "online", None: "online"}.get(mode, mode)
        if self.mode not in ("online", "offline"):
            raise ConfigError(f"WANDB_MODE={mode!r} cannot take results", hint="use online or offline")
        self.directory = directory or Path.cwd()  # wandb writes under <directory>/wandb
        self.flush_timeout = flush_timeout
        self._runs: dict[tuple[str | None, str, str], Any] = {}

    def _where(self, d: Delivery) -> tuple[str | None, str, str]:
        return self.entity, self.project or d.watch, d.wandb_run_id or wandb_run_id(d.watch)

    def _run(self, d: Delivery) -> Any:
        import wandb

        key = self._where(d)
        if key not in self._runs:
            settings: dict[str, Any] = {"console": "off", "silent": True, "x_disable_stats": True,
                                        "x_disable_meta": True, "x_transaction_log_flush_interval": 0.1}
            mode: Any = self.mode
            if mode == "online":  # the trainer (or another worker) may be writing this run right now
                mode = "shared"
                settings.update(x_label="assayer", x_primary=False, x_update_finish_state=False)
            try:
                run = wandb.init(entity=key[0], project=key[1], id=key[2], name=None if d.wandb_run_id else d.watch,
                                 resume=None if mode == "shared" else "allow", mode=mode, dir=self.directory,
                                 reinit="create_new", settings=wandb.Settings(**settings))
            except wandb.errors.CommError as exc:
                raise SinkUnavailable(f"W&B run {'/'.join(filter(None, key))}: {exc}", hint="the delivery is retried") from exc
            run.define_metric(WANDB_STEP_METRIC)
            run.define_metric(PREFIX + "*", step_metric=WANDB_STEP_METRIC)
            self._runs[key] = run
        return self._runs[key]

    def deliver(self, d: Delivery) -> None:
        run = self._run(d)
        row: dict[str, Any] = {PREFIX + k: v for k, v in d.numeric().items()}
        if d.step is not None:
            row[WANDB_STEP_METRIC] = d.step
        row.update({"assayer/result": d.digest, "assayer/checkpoint": d.path, "assayer/version": d.version})
        run.log(row)
        # log() only queues the row; wait until W&B's own process has written it to the run's file.
        deadline, sync_file = time.monotonic() + self.flush_timeout, Path(run.settings.sync_file)
        while not (sync_file.exists() and _wandb_has(sync_file, d.digest)):
            if time.monotonic() > deadline:
                raise SinkUnavailable(f"W&B did not write the result to {sync_file} within {self.flush_timeout:g} s")
            time.sleep(0.05)

    def delivered(self, d: Delivery) -> bool:
        entity, project, run_id = self._where(d)
        if self.mode != "online":
            files = glob.glob(str(self.directory / "wandb" / "*" / glob.escape(f"run-{run_id}.wandb")))
            return any(_wandb_has(Path(f), d.digest) for f in files if "latest-run" not in f)
        import wandb
        from wandb.apis.public.runs import RunNotFoundError

        try:
            api = wandb.Api()
            run = api.run(f"{entity or api.default_entity}/{project}/{run_id}")
            return any(row.get("assayer/result") == d.digest
                       for row in run.scan_history(keys=["assayer/result"], use_cache=False))
        except RunNotFoundError:
            return False
        except wandb.errors.CommError as exc:
            raise SinkUnavailable(f"W&B run {project}/{run_id} cannot be read: {exc}") from exc

    def close(self) -> None:
        while self._runs:
            self._runs.popitem()[1].finish()


SINKS: dict[str, type[Sink]] = {"tensorboard": TensorBoardSink, "mlflow": MlflowSink, "wandb": WandbSink}
"""Every sink a watch can ``--report-to``, by name."""


def parse_report_to(value: str) -> list[str]:
    """``"tensorboard,mlflow"`` -> ``["tensorboard", "mlflow"]``; names the bad one and the valid ones."""
    names = [n.strip().lower() for n in value.split(",") if n.strip()]
    for n in names:
        if n not in SINKS:
            raise ConfigError(f"unknown sink {n!r} in --report-to", hint=f"use a comma-separated list of: {', '.join(SINKS)}")
    return list(dict.fromkeys(names))


def build(name: str, results_dir: Path, env: Mapping[str, str] = os.environ) -> Sink:
    """Make sink ``name`` from the tracker's standard environment variables (read here, once)."""
    if name == "tensorboard":
        return TensorBoardSink(results_dir)
    if name == "mlflow":
        return MlflowSink(env.get("MLFLOW_TRACKING_URI"), env.get("MLFLOW_EXPERIMENT_NAME"))
    if name == "wandb":
        return WandbSink(env.get("WANDB_PROJECT"), env.get("WANDB_ENTITY"), env.get("WANDB_MODE"),
                         Path(env["WANDB_DIR"]) if env.get("WANDB_DIR") else None)
    parse_report_to(name)  # raises, naming the valid ones
    raise AssertionError(name)
