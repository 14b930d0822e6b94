"""The trackers' own sides, for tests: a real ``mlflow server`` and readers of W&B and TensorBoard files.

The readers are independent of ``assayer.sinks``: they are the tests' oracle.
"""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from harness import free_port, wait_for


class MlflowServer:
    """``mlflow server`` on 127.0.0.1 with a SQLite store in ``workdir``; restartable on the same port."""

    def __init__(self, workdir: Path) -> None:
        self.dir = workdir
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = workdir / "mlflow-server.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        mlflow = Path(sys.executable).with_name("mlflow")
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [str(mlflow), "server", "--backend-store-uri", f"sqlite:///{self.dir / 'mlflow.db'}",
                 "--default-artifact-root", (self.dir / "artifacts").as_uri(), "--host", "127.0.0.1",
                 "--port", str(self.port), "--workers", "1"],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)  # its own group: uvicorn is a child
        wait_for(self._ready, 180, interval=0.2, what=f"mlflow server on port {self.port} (log: {self.log})")

    def _ready(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"mlflow server exited:\n{self.log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(self.url + "/health", timeout=2) as resp:
                return bool(resp.status == 200)
        except OSError:
            return False

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        wait_for(lambda: not self._listening(), 20, what="mlflow server's port to close")

    def _listening(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/health", timeout=1):
                return True
        except OSError:
            return False


def wandb_records(path: Path) -> Iterator[Any]:
    """Every ``wandb_internal_pb2.Record`` in a ``.wandb`` file (format: see shared/TOOLING.md)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B transaction log"
    block, offset, parts = 32 * 1024, 7, b""
    while offset + 7 <= len(data):
        if block - offset % block < 7:  # the rest of a block that cannot hold a record header
            offset += block - offset % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[offset:offset + 7])
        payload = data[offset + 7:offset + 7 + length]
        offset += 7 + length
        parts = payload if kind in (1, 2) else parts + payload
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(parts)
            yield record


def wandb_files(wandb_dir: Path, run_id: str) -> list[Path]:
    """The transaction logs of every offline (or online) directory of run ``run_id``."""
    return sorted(p for p in (wandb_dir / "wandb").glob(f"*/run-{run_id}.wandb") if "latest-run" not in str(p))


def wandb_history(wandb_dir: Path, run_id: str) -> list[dict[str, Any]]:
    """Every history row of the run, as ``{key: value}``, in file order."""
    rows = []
    for path in wandb_files(wandb_dir, run_id):
        for record in wandb_records(path):
            if record.WhichOneof("record_type") == "history":
                rows.append({"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in record.history.item})
    return rows


def wandb_metric_definitions(wandb_dir: Path, run_id: str) -> list[Any]:
    return [r.metric for p in wandb_files(wandb_dir, run_id) for r in wandb_records(p)
            if r.WhichOneof("record_type") == "metric"]


def tensorboard_scalars(logdir: Path, tag: str) -> list[tuple[int, float]]:
    """(step, value) of ``tag`` as TensorBoard's own EventAccumulator reads the directory, by step."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir))  # purge_orphaned_data=True, TensorBoard's default
    acc.Reload()
    if tag not in acc.Tags()["scalars"]:
        return []
    return sorted((e.step, e.value) for e in acc.Scalars(tag))
