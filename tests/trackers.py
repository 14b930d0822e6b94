"""The trackers' own sides, for tests: a real ``mlflow server`` (shared by the run), and readers of W&B and TensorBoard files.

The readers are independent of ``assayer.sinks``: they are the tests' oracle.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from harness import free_port, wait_for

LAUNCH = """\
import os, subprocess, sys
with open(sys.argv[2], "ab") as log:
    proc = subprocess.Popen(sys.argv[3:], stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
with open(sys.argv[1], "w") as pidfile:
    pidfile.write(str(proc.pid))
os._exit(0)
"""
"""Starts a command in a session of its own and writes its pid to ``argv[1]``: a server no worker owns."""


class MlflowServer:
    """``mlflow server`` on 127.0.0.1 with a SQLite store in ``workdir``.

    It is no process's child (see :data:`LAUNCH`): any process may stop it (its process group,
    ``pid``), and it outlives the pytest-xdist worker that started it.
    """

    def __init__(self, workdir: Path, port: int | None = None, pid: int | None = None) -> None:
        self.dir = workdir
        self.port = port or free_port()
        self.pid = pid
        self.log = workdir / "mlflow-server.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        mlflow, pidfile = Path(sys.executable).with_name("mlflow"), self.dir / "mlflow-server.pid"
        # MLflow 3's job execution (seven huey consumer processes, 20 s of CPU) serves its GenAI jobs, not tracking.
        env = os.environ | {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        subprocess.run(
            [sys.executable, "-c", LAUNCH, str(pidfile), str(self.log),
             str(mlflow), "server", "--backend-store-uri", f"sqlite:///{self.dir / 'mlflow.db'}",
             "--default-artifact-root", (self.dir / "artifacts").as_uri(), "--host", "127.0.0.1",
             "--port", str(self.port), "--workers", "1"], check=True, timeout=60, env=env)
        self.pid = int(pidfile.read_text())
        wait_for(self._ready, 180, interval=0.2, what=f"mlflow server on port {self.port} (log: {self.log})")

    def _ready(self) -> bool:
        assert self.pid is not None
        if not _alive(self.pid):
            raise AssertionError(f"mlflow server exited:\n{self.log.read_text()[-3000:]}")
        return self._listening()

    def stop(self) -> None:
        """SIGTERM to the server's process group (uvicorn is a child), SIGKILL if it is still there 20 s later."""
        pid = self.pid
        if pid is None:
            return

        def gone() -> bool:
            return not self._listening() and not _alive(pid)

        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGTERM)
        try:
            wait_for(gone, 20, what=f"mlflow server {pid} to exit")
        except AssertionError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
            wait_for(gone, 10, what=f"mlflow server {pid} to exit after SIGKILL")
        self.pid = None

    def _listening(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/health", timeout=2) as resp:
                return bool(resp.status == 200)
        except OSError:
            return False


@contextlib.contextmanager
def shared_mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    """One ``mlflow server`` for the whole test run, however many pytest-xdist workers use it.

    Starting one costs 7-10 s of CPU (MLflow's imports, the SQLite store's migrations) and 10-30 s
    on a loaded machine: once per run, not once per worker and test module. The first worker to
    ask starts it under a lock and writes down its pid and port; the others use that one; each
    records itself as a user while it holds it, and the last to let go (at the end of its session)
    stops it. A user that died is forgotten at the next start or end of another, so a crashed
    worker does not keep the server running. Tests stay out of each other's way with their own
    experiment and watch names; a test that needs MLflow down takes down a :class:`TcpProxy`
    in front of it, never the shared server.
    """
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the run's own directory, above each worker's basetemp
    state_file, me = root / "mlflow-server.json", os.getpid()

    @contextlib.contextmanager
    def state() -> Iterator[dict[str, Any]]:
        with open(root / "mlflow-server.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            data: dict[str, Any] = json.loads(state_file.read_text()) if state_file.exists() else {}
            data["users"] = [pid for pid in data.get("users", []) if _alive(pid)]
            yield data
            state_file.write_text(json.dumps(data))

    with state() as data:
        if data.get("port") is not None and data["users"]:
            server = MlflowServer(Path(data["dir"]), port=data["port"], pid=data["pid"])
        else:
            if data.get("pid") is not None:  # every user died without stopping it
                MlflowServer(Path(data["dir"]), port=data["port"], pid=data["pid"]).stop()
            workdir = root / "mlflow"
            shutil.rmtree(workdir, ignore_errors=True)
            workdir.mkdir()
            server = MlflowServer(workdir)
            try:
                server.start()
            except BaseException:
                server.stop()  # half started: no one would stop it
                raise
            data.update(pid=server.pid, port=server.port, dir=str(workdir))
        data["users"].append(me)
    try:
        yield server
    finally:
        with state() as data:
            if me in data["users"]:
                data["users"].remove(me)
            if not data["users"]:
                server.stop()
                data.update(pid=None, port=None)


def _alive(pid: int) -> bool:
    """Process ``pid`` exists and has not exited (an exited one waiting to be reaped is not alive)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


class TcpProxy:
    """127.0.0.1:``port`` forwarding to a local server's ``target`` port; a test takes it down and brings it back.

    :meth:`stop` is the server going down as its clients see it: the port refuses connections and
    the open ones are closed. :meth:`start` brings it back on the same port.
    """

    def __init__(self, target: int) -> None:
        self.target = target
        self.port = free_port()
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self._open: set[tuple[socket.socket, socket.socket]] = set()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # the port again, past its closed connections
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        with self._lock:
            self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def stop(self) -> None:
        with self._lock:
            listener, self._listener = self._listener, None
            pairs, self._open = self._open, set()
        if listener is not None:
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)  # wakes the accept() blocked in its thread
            listener.close()
        for pair in pairs:
            _drop(*pair)

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # stopped
            threading.Thread(target=self._serve, args=(client, listener), daemon=True).start()

    def _serve(self, client: socket.socket, listener: socket.socket) -> None:
        try:
            upstream = socket.create_connection(("127.0.0.1", self.target), timeout=10)
        except OSError:
            client.close()
            return
        upstream.settimeout(None)
        pair = (client, upstream)
        with self._lock:
            up = self._listener is listener  # not stopped since this connection was accepted
            if up:
                self._open.add(pair)
        if up:
            back = threading.Thread(target=_pipe, args=(upstream, client), daemon=True)
            back.start()
            _pipe(client, upstream)
            back.join()
        with self._lock:
            self._open.discard(pair)
        for sock in pair:
            sock.close()


def _pipe(src: socket.socket, dst: socket.socket) -> None:
    """Copy ``src`` to ``dst`` until ``src`` ends (then end ``dst``'s side too) or either fails (then drop both)."""
    try:
        while data := src.recv(65536):
            dst.sendall(data)
        dst.shutdown(socket.SHUT_WR)
    except OSError:
        _drop(src, dst)


def _drop(*socks: socket.socket) -> None:
    for sock in socks:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)


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
