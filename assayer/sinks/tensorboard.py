"""TensorBoard: one event file per result, so a redelivery replaces instead of adding.

The file is named from the result, written under a temporary name (without "tfevents", so no
reader picks it up) and renamed: ``delivered()`` is "the file exists", and delivering again
replaces the file whole. Exactly once.

Each file starts with a ``brain.Event:2`` file version. TensorBoard's EventAccumulator then purges
"orphaned" points only after a SessionLog START, which Assayer never writes; without a file
version it would drop every point logged after a later step (a late evaluation). The files are
named by ``finished_at`` first, because TensorBoard's legacy loader reads a directory's files in
name order and skips a file named before the one it has read last.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import ConfigError
from .base import PREFIX, Delivery, Sink, need


class TensorBoardSink(Sink):
    """Event files for ``tensorboard --logdir <results_dir>/tensorboard`` (a run per watch), or the watch's own dir."""

    name = "tensorboard"

    def __init__(self, results_dir: Path | None = None) -> None:
        need("tensorboard", "tensorboard")
        self.results_dir = results_dir

    def directory(self, d: Delivery) -> Path:
        if d.tensorboard_dir:
            return Path(d.tensorboard_dir)
        if self.results_dir is None:
            raise ConfigError(f"watch {d.watch!r}: no TensorBoard directory", hint="set the watch's tensorboard_dir")
        return self.results_dir / "tensorboard" / d.watch

    def file(self, d: Delivery) -> Path:
        return self.directory(d) / f"events.out.tfevents.{int(d.finished_at):010d}.assayer-{d.digest}"

    def delivered(self, d: Delivery) -> bool:
        return self.file(d).exists()

    def deliver(self, d: Delivery) -> None:
        from tensorboard.compat.proto import event_pb2, summary_pb2, tensor_pb2, tensor_shape_pb2, types_pb2
        from tensorboard.summary.writer.record_writer import RecordWriter

        step = d.step if d.step is not None else 0  # TensorBoard's own default step
        values = [summary_pb2.Summary.Value(tag=PREFIX + k, simple_value=v) for k, v in d.numeric().items()]
        text = tensor_pb2.TensorProto(dtype=types_pb2.DT_STRING, tensor_shape=tensor_shape_pb2.TensorShapeProto(),
                                      string_val=[f"`{d.path}` version `{d.version}` ({d.evaluator})".encode()])
        meta = summary_pb2.SummaryMetadata(plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="text"))
        values.append(summary_pb2.Summary.Value(tag="assayer/checkpoint", metadata=meta, tensor=text))
        events = [event_pb2.Event(wall_time=d.finished_at, file_version="brain.Event:2"),
                  event_pb2.Event(wall_time=d.finished_at, step=step, summary=summary_pb2.Summary(value=values))]
        final = self.file(d)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.with_name(f".{final.name}.{os.getpid()}.tmp")
        with open(tmp, "wb") as fh:
            writer = RecordWriter(fh)
            for event in events:
                writer.write(event.SerializeToString())
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, final)
        dir_fd = os.open(final.parent, os.O_RDONLY)  # the rename itself survives a crash once the directory is synced
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
