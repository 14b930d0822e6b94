"""MLflow: into the training run (``mlflow_run_id``) or one run per watch, through ``MlflowClient``.

The metrics and a marker tag ``assayer.result.step-<step>.<digest>`` (its value holds path,
version and evaluator) go in one ``log_batch``; ``delivered()`` looks for the marker. MLflow's SQL
store (3.17) does *not* commit a batch atomically: metrics, then tags, each in its own
transaction. A kill between the two leaves metrics without their marker; the redelivery then sends
identical rows (same key, value, step and timestamp, the timestamp being the result's
``finished_at``), which the metric table's primary key drops. So exactly once with a SQL backend;
a file-store backend (``./mlruns``, no server) would keep the second copy in that window.

The run for a watch is found by its tag ``assayer.watch``. Workers that create it at the same
moment all keep the oldest (by start time, then id) and delete their own; only if their clocks
disagree by more than the gap between the two creations can two runs remain.

MLflow's client retries a failing request itself (``MLFLOW_HTTP_REQUEST_MAX_RETRIES``, 7 by
default, with backoff); once it gives up, an unreachable or failing server is :class:`SinkUnavailable`.
"""

from __future__ import annotations

import contextlib
import json
import posixpath
import re
import threading
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

from ..errors import ConfigError
from .base import PREFIX, Delivery, Sink, SinkUnavailable, need

WATCH_TAG = "assayer.watch"
"""Tag that finds the run Assayer made for a watch again (when no ``mlflow_run_id`` is given)."""


def metric_key(metric: str) -> str:
    """``eval/<metric>`` with the characters MLflow refuses in a metric name replaced by ``_``."""
    key = PREFIX + re.sub(r"[^\w.\- /]", "_", metric)
    return key if posixpath.normpath(key) == key else PREFIX + re.sub(r"[^\w.\- ]", "_", metric)


_PROCESS_LOCKS: dict[tuple[str, str], threading.Lock] = {}
"""One lock per (experiment, watch) for the sinks of this process (see ``MlflowSink.creation_lock``)."""


class MlflowSink(Sink):
    name = "mlflow"

    def __init__(self, tracking_uri: str | None = None, experiment: str | None = None) -> None:
        need("mlflow", "mlflow")
        from mlflow import MlflowClient

        self.client = MlflowClient(tracking_uri)  # None: MLFLOW_TRACKING_URI, resolved by MLflow itself
        self.experiment = experiment  # None: the watch's name
        self._runs: dict[tuple[str, str], str] = {}
        # Finding or making a watch's run is one step at a time: in this process always, across the watch
        # workers when the reporter gives a lock shared through Redis. Otherwise a worker could log into a
        # run that a worker who made an older one at the same moment is about to delete.
        self.creation_lock: Callable[[str], AbstractContextManager[Any]] | None = None

    def _call(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        from mlflow.exceptions import MlflowException

        try:
            return fn(*args, **kwargs)
        except MlflowException as exc:
            status = exc.get_http_status_code()
            if status >= 500 or status == 429:  # a refused connection comes as INTERNAL_ERROR (500) too
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
        return list(self._call("search runs", self.client.search_runs, [exp_id],
                               filter_string=f"tags.`{WATCH_TAG}` = '{quoted}'",
                               order_by=["attributes.start_time ASC", "attributes.run_id ASC"]))

    def run_id(self, d: Delivery, create: bool = True) -> str | None:
        """The run this result goes to; None when it is the watch's run and that does not exist yet."""
        if d.mlflow_run_id:
            return d.mlflow_run_id
        key = (self.experiment or d.watch, d.watch)
        if key not in self._runs:
            with _PROCESS_LOCKS.setdefault(key, threading.Lock()), (
                    self.creation_lock(f"mlflow|{key[0]}|{key[1]}") if self.creation_lock else contextlib.nullcontext()):
                return self._find_or_make_run(key, d, create)
        return self._runs[key]

    def _find_or_make_run(self, key: tuple[str, str], d: Delivery, create: bool) -> str | None:
        if key not in self._runs:
            exp_id = self._experiment_id(key[0])
            runs = self._watch_runs(exp_id, d.watch)
            if not runs and not create:
                return None
            if not runs:
                mine = self._call("create a run", self.client.create_run, exp_id, run_name=d.watch,
                                  tags={WATCH_TAG: d.watch})
                runs = self._watch_runs(exp_id, d.watch) or [mine]
                if runs[0].info.run_id != mine.info.run_id:  # another worker's run is older: use that one
                    self._call("delete a duplicate run", self.client.delete_run, mine.info.run_id)
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
        stamp = int(d.finished_at * 1000)
        step = d.step if d.step is not None else 0  # MLflow's own default step
        metrics = [Metric(metric_key(k), v, stamp, step) for k, v in d.numeric().items()]
        tags = [RunTag(self.marker(d), json.dumps(d.info(), sort_keys=True)[:8000])]  # MLflow's limit on a tag value
        self._call("log the result", self.client.log_batch, run_id, metrics=metrics, tags=tags)
