"""Weights & Biases: into the training run (``wandb_run_id``) or one run per watch.

``eval/*`` is plotted against ``train/global_step``, the step metric Hugging Face's WandbCallback
defines (transformers 5.24), so late and out-of-order points land at their training step and line
up with the trainer's curves. W&B's own ``_step`` only counts rows.

The marker ``assayer/result`` is in the same history row as the metrics, and ``deliver()``
returns only once W&B's service has written that row to the run's local ``.wandb`` file (log()
only queues it; a killed client loses what is queued). Offline, ``delivered()`` reads those files:
exactly once. Online, it asks the server (``scan_history``), and the row reaches the server after
the local write: a worker killed in between loses the row from the server (the retry logs it
again, once); a retry made while the first writer still lives can look too early and log a
second, identical row at the same step. Online runs are written in W&B's shared mode
(experimental in wandb 0.31; not exercised by the tests, which have no network) because the
trainer or another worker may be writing the same run.

W&B cannot merge several offline directories of one run id: ``wandb sync`` of a later one
replaces the earlier history (wandb issues #3841, #5865). Each worker process (and each restart)
writes its own offline directory, so offline mode suits one worker, or reading the files.
"""

from __future__ import annotations

import glob
import hashlib
import importlib
import json
import re
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

from ..errors import ConfigError
from .base import PREFIX, Delivery, Sink, SinkUnavailable, need

STEP_METRIC = "train/global_step"
"""The x-axis of ``eval/*``: the one Hugging Face's WandbCallback defines."""

FLUSH_TIMEOUT = 30.0
"""Seconds ``deliver()`` waits for W&B to write the row to the run's local file before it gives up (retryable)."""

MARKER = "assayer/result"
"""History key holding the result's digest, in the same row as its metrics."""

BLOCK = 32 * 1024


def records(path: Path) -> Iterator[bytes]:
    """The records of a ``.wandb`` file: a 7-byte header, then LevelDB-log blocks of 32 KiB."""
    data = path.read_bytes()
    pos, parts = 7, b""
    while pos + 7 <= len(data):
        if BLOCK - pos % BLOCK < 7:  # a block's tail too short for a record header is padding
            pos += BLOCK - pos % BLOCK
            continue
        _crc, length, kind = struct.unpack_from("<IHB", data, pos)
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if pos > len(data):  # a record still being written
            return
        parts = chunk if kind in (1, 2) else parts + chunk  # full, first; middle, last
        if kind in (1, 4):
            yield parts


def has_result(path: Path, digest: str) -> bool:
    pb: Any = importlib.import_module("wandb.proto.wandb_internal_pb2")
    want, record = json.dumps(digest), pb.Record()
    for raw in records(path):
        if MARKER.encode() in raw:
            record.ParseFromString(raw)
            if any(i.nested_key == [MARKER] and i.value_json == want for i in record.history.item):
                return True
    return False


def run_id_for(watch: str) -> str:
    """The id of the run Assayer makes for a watch when none is given: readable and stable."""
    slug = re.sub(r"[^A-Za-z0-9_-]", "-", watch)[:40]
    return f"assayer-{slug}-{hashlib.sha256(watch.encode()).hexdigest()[:8]}"


class WandbSink(Sink):
    """Runs stay open for the life of the process, shared by every WandbSink in it (W&B refuses a
    second open run with the same id), until ``close()`` finishes them all."""

    name = "wandb"
    _open: ClassVar[dict[tuple[str | None, str, str], Any]] = {}

    def __init__(self, project: str | None = None, entity: str | None = None, mode: str | None = None,
                 directory: Path | None = None, flush_timeout: float = FLUSH_TIMEOUT) -> None:
        need("wandb", "wandb")
        self.project, self.entity = project, entity  # project None: the watch's name
        self.mode = {"dryrun": "offline", "run": "online", None: "online"}.get(mode, mode)
        if self.mode not in ("online", "offline"):
            raise ConfigError(f"WANDB_MODE={mode!r} cannot take results", hint="use online or offline")
        self.directory = directory or Path.cwd()  # W&B writes under <directory>/wandb
        self.flush_timeout = flush_timeout

    def _where(self, d: Delivery) -> tuple[str | None, str, str]:
        return self.entity, self.project or d.watch, d.wandb_run_id or run_id_for(d.watch)

    def _run(self, d: Delivery) -> Any:
        import wandb

        key = self._where(d)
        if key not in self._open:
            settings: dict[str, Any] = {"console": "off", "silent": True, "x_disable_stats": True,
                                        "x_disable_meta": True, "x_transaction_log_flush_interval": 0.1}
            mode: Any = self.mode
            if mode == "online":
                mode = "shared"
                settings.update(x_label="assayer", x_primary=False, x_update_finish_state=False)
            try:
                run = wandb.init(entity=key[0], project=key[1], id=key[2], name=None if d.wandb_run_id else d.watch,
                                 resume=None if mode == "shared" else "allow", mode=mode, dir=self.directory,
                                 reinit="create_new", settings=wandb.Settings(**settings))
            except wandb.errors.CommError as exc:
                raise SinkUnavailable(f"W&B run {'/'.join(filter(None, key))}: {exc}", hint="the delivery is retried") from exc
            run.define_metric(STEP_METRIC)
            # step_sync off: a result without a step must not borrow the step of the row logged before it.
            run.define_metric(PREFIX + "*", step_metric=STEP_METRIC, step_sync=False)
            self._open[key] = run
        return self._open[key]

    def deliver(self, d: Delivery) -> None:
        run = self._run(d)
        row: dict[str, Any] = {PREFIX + k: v for k, v in d.numeric().items()}
        if d.step is not None:  # without one, the row has no training step and stays off the eval/* charts
            row[STEP_METRIC] = d.step
        row.update({MARKER: d.digest, "assayer/checkpoint": d.path, "assayer/version": d.version})
        run.log(row)
        deadline, sync_file = time.monotonic() + self.flush_timeout, Path(run.settings.sync_file)
        while not (sync_file.exists() and has_result(sync_file, d.digest)):
            if time.monotonic() > deadline:
                raise SinkUnavailable(f"W&B did not write the result to {sync_file} within {self.flush_timeout:g} s")
            time.sleep(0.05)

    def delivered(self, d: Delivery) -> bool:
        entity, project, run_id = self._where(d)
        if self.mode == "offline":
            files = glob.glob(str(self.directory / "wandb" / "*" / glob.escape(f"run-{run_id}.wandb")))
            return any(has_result(Path(f), d.digest) for f in files if "latest-run" not in f)
        import wandb
        from wandb.apis.public.runs import RunNotFoundError

        try:
            api = wandb.Api()
            run = api.run(f"{entity or api.default_entity}/{project}/{run_id}")
            return any(row.get(MARKER) == d.digest for row in run.scan_history(keys=[MARKER], use_cache=False))
        except RunNotFoundError:
            return False
        except wandb.errors.CommError as exc:
            raise SinkUnavailable(f"W&B run {project}/{run_id} cannot be read: {exc}") from exc

    def close(self) -> None:
        while self._open:
            self._open.popitem()[1].finish()
