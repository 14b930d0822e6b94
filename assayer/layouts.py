"""Directory checkpoints: which directories are checkpoints, and when each one is complete.

Large runs write a checkpoint as a directory and finish it with a marker. A :class:`Layout`
recognises one writer's directories from their name and top-level entries, and states when such
a directory is complete; each rule below is checked from the bytes where the format allows
(every shard an index names present and complete by its own header, torch zip archives complete
by their end records) and from the marker the writer writes last. Once a layout's rule holds, the
scanner still waits until the members have been unchanged for a short quiet time (the whole
``--settle`` time for the settle-only ``dir`` layout) before it hands the directory over.

A directory that says it is incomplete is never evaluated, however long it waits: its
:class:`Verdict` says what it waits for ("2 of 4 shards"), which ``assayer status`` shows.

Layouts never touch the filesystem: they see a directory through a :class:`DirView` (member
names, sizes, mtimes, a format check and reads of small files), so the same rules can run over
an object-store listing.
"""

from __future__ import annotations

import json
import re
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar, Protocol

from .readiness import Format

LAYOUTS = ("auto", "file", "hf", "dcp", "deepspeed", "megatron", "orbax", "marker", "dir")
"""Values of ``--layout``: ``auto`` detects each directory's writer, ``file`` treats none as a checkpoint."""

DEFAULT_MARKERS = ("STABLE", "COMMITTED", "_SUCCESS")
"""Marker files that in-house trainers write last; ``--ready-marker`` adds more."""

_DIR_STEP = re.compile(r"(?:checkpoint-|global_step|iter_|step[-_=]?)(\d+)(?:[-_.].*)?|(\d+)", re.IGNORECASE)


def dir_step(name: str) -> int | None:
    """The step a checkpoint directory's name tells.

    ``checkpoint-500``, ``global_step500``, ``iter_0000500``, ``step-500``, ``step500-unsharded``, ``500``.
    """
    match = _DIR_STEP.fullmatch(name)
    if not match:
        return None
    return int(match.group(1) or match.group(2))


def step_named(name: str) -> bool:
    """Whether a directory's name is one that trainers give checkpoints (see :func:`dir_step`)."""
    return _DIR_STEP.fullmatch(name) is not None


@dataclass(frozen=True)
class Member:
    """One file of a directory checkpoint, as a listing gives it."""

    size: int
    mtime: float
    version: str


class DirView(Protocol):
    """What a layout may know of a directory: a listing and reads of small files."""

    @property
    def name(self) -> str:
        """The directory's own name, e.g. ``checkpoint-500``."""

    @property
    def members(self) -> Mapping[str, Member]:
        """Every file below the directory, by path relative to it (``/``-separated)."""

    def format_of(self, rel: str) -> Format:
        """What a member's own format says of its completeness (see :mod:`assayer.readiness`)."""

    def read_text(self, rel: str, limit: int) -> str | None:
        """A member's text (at most ``limit`` bytes), or None when it cannot be read."""

    def sibling_text(self, name: str, limit: int) -> str | None:
        """The text of a file beside the directory (DeepSpeed's ``latest``), or None."""


@dataclass(frozen=True)
class Verdict:
    complete: bool
    waiting: str = ""
    """What an incomplete checkpoint still waits for, in words for ``assayer status``."""


DONE = Verdict(True)


class Layout(ABC):
    """A writer's directory layout: how it is recognised and when it is complete."""

    name: ClassVar[str] = ""
    recognised_by: ClassVar[str] = ""
    complete_when: ClassVar[str] = ""
    settle_only: ClassVar[bool] = False
    """True when no marker or format proves completeness, so the whole settle time applies."""

    @abstractmethod
    def claims(self, dirname: str, names: frozenset[str], holds_weights: bool) -> bool:
        """Whether a directory with this name and these top-level entries is one of this layout's."""

    @abstractmethod
    def check(self, view: DirView) -> Verdict:
        """Whether the directory is complete, and if not, what it waits for."""


WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".safetensors", ".distcp", ".model", ".state")
"""Members with these endings hold tensors and are checked by their format; the others (JSON, text, empty
markers) only by the quiet time."""


def _members_whole(view: DirView, rels: Sequence[str] | None = None) -> Verdict:
    """No data member (or none of ``rels``) whose own format proves it is still being written."""
    for rel in sorted(view.members) if rels is None else rels:
        if not rel.endswith(WEIGHT_SUFFIXES):
            continue
        if view.format_of(rel) is Format.INCOMPLETE:
            return Verdict(False, f"{rel} still being written")
    return DONE


class HuggingFace(Layout):
    name = "hf"
    recognised_by = ("`checkpoint-N`, or a `model*.safetensors` / `pytorch_model*.bin` / `adapter_model.*` "
                     "weight file or index, or `trainer_state.json`")
    complete_when = ("every shard the `*.index.json` names is present and complete by its header (single weight files "
                     "complete by format); for Trainer checkpoints also `trainer_state.json`, which `Trainer` writes last")

    SINGLE = ("model.safetensors", "pytorch_model.bin", "adapter_model.safetensors", "adapter_model.bin")
    INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
    SHARD = re.compile(r"(?:model|pytorch_model)-\d+-of-(\d+)\.(?:safetensors|bin)")
    TRAINER = ("trainer_state.json", "optimizer.pt", "scheduler.pt", "training_args.bin", "rng_state.pth")
    STATE = "trainer_state.json"
    CHECKPOINT = re.compile(r"checkpoint-\d+")

    def claims(self, dirname: str, names: frozenset[str], holds_weights: bool) -> bool:
        if self.CHECKPOINT.fullmatch(dirname) or self.STATE in names:
            return True
        return any(n in self.SINGLE or n in self.INDEXES or self.SHARD.fullmatch(n) for n in names)

    def check(self, view: DirView) -> Verdict:
        top = {rel for rel in view.members if "/" not in rel}
        trainer = bool(self.CHECKPOINT.fullmatch(view.name)) or any(
            n in self.TRAINER or n.startswith("rng_state") for n in top)
        weights = self._weights(view, top)
        if not weights.complete:
            return weights
        if trainer and self.STATE not in top:
            return Verdict(False, f"{self.STATE} (Trainer writes it last)")
        return _members_whole(view)

    def _weights(self, view: DirView, top: set[str]) -> Verdict:
        for index in self.INDEXES:
            if index in top:
                return self._shards(view, index, top)
        shards = sorted(n for n in top if self.SHARD.fullmatch(n))
        if shards:
            total = int(self.SHARD.fullmatch(shards[0]).group(1))  # type: ignore[union-attr]
            return Verdict(False, f"{len(shards)} of {total} shards and the index")
        singles = [n for n in self.SINGLE if n in top]
        if singles or self.STATE in top:
            return _members_whole(view, singles)
        return Verdict(False, "the model weights")

    def _shards(self, view: DirView, index: str, top: set[str]) -> Verdict:
        text = view.read_text(index, 64 << 20)
        try:
            weight_map = json.loads(text or "")["weight_map"]
            shards = sorted({str(v) for v in weight_map.values()})
        except (ValueError, KeyError, TypeError, AttributeError):
            return Verdict(False, f"{index} still being written")
        whole = [s for s in shards if s in view.members and view.format_of(s) is not Format.INCOMPLETE]
        if len(whole) < len(shards):
            return Verdict(False, f"{len(whole)} of {len(shards)} shards")
        return DONE


class DistributedCheckpoint(Layout):
    name = "dcp"
    recognised_by = "`*.distcp` files or `.metadata` (torch.distributed.checkpoint, torchtitan)"
    complete_when = "`.metadata` is present: the coordinator writes it after every rank's `*.distcp` file"

    def claims(self, dirname: str, names: frozenset[str], holds_weights: bool) -> bool:
        return ".metadata" in names or any(n.endswith(".distcp") for n in names)

    def check(self, view: DirView) -> Verdict:
        if ".metadata" not in view.members:
            shards = sum(1 for rel in view.members if rel.endswith(".distcp"))
            return Verdict(False, f".metadata (written last; {shards} .distcp file(s) so far)")
        return _members_whole(view)


class DeepSpeed(Layout):
    name = "deepspeed"
    recognised_by = "`global_stepN`, or `mp_rank_*_model_states.pt` / `*_optim_states.pt` files"
    complete_when = ("the `latest` file beside it names this tag (or a later `global_stepN`), every `.pt` file is "
                     "complete by format and the ranks of the `zero_pp_rank_R_*` files run 0..R without a gap: rank 0 "
                     "writes `latest` before the barrier, while other ranks may still be writing")

    FILES = re.compile(r".*mp_rank_\d+_model_states\.pt|.*_optim_states\.pt|zero_pp_rank_.*")
    RANKED = re.compile(r"(.*)zero_pp_rank_(\d+)_(mp_rank_\d+_(?:optim|model)_states\.pt)")
    TAG = re.compile(r"global_step\d+")
    LATEST = "latest"

    def claims(self, dirname: str, names: frozenset[str], holds_weights: bool) -> bool:
        return bool(self.TAG.fullmatch(dirname)) or any(self.FILES.fullmatch(n) for n in names)

    def check(self, view: DirView) -> Verdict:
        latest = (view.sibling_text(self.LATEST, 4096) or "").strip()
        if latest != view.name:
            ours, theirs = dir_step(view.name), dir_step(latest)
            if ours is None or theirs is None or theirs <= ours:
                return Verdict(False, f"'{self.LATEST}' to name {view.name}" + (f" (it names {latest})" if latest else ""))
        ranks: dict[tuple[str, str], set[int]] = {}
        for rel in view.members:
            match = self.RANKED.fullmatch(rel)
            if match:
                ranks.setdefault((match.group(1), match.group(3)), set()).add(int(match.group(2)))
        for (prefix, kind), seen in sorted(ranks.items()):
            gap = next(r for r in range(max(seen) + 2) if r not in seen)
            if gap <= max(seen):
                return Verdict(False, f"{prefix}zero_pp_rank_{gap}_{kind}")
        return _members_whole(view)


class Megatron(Layout):
    name = "megatron"
    recognised_by = "`iter_NNNNNNN` (Megatron-LM, NeMo 1)"
    complete_when = ("`latest_checkpointed_iteration.txt` beside it holds this iteration or a later one; "
                     "Megatron writes it after every rank saved")

    ITER = re.compile(r"iter_(\d+)")
    TRACKER = "latest_checkpointed_iteration.txt"

    def claims(self, dirname: str, names: frozenset[str], holds_weights: bool) -> bool:
        return bool(self.ITER.fullmatch(dirname))

    def check(self, view: DirView) -> Verdict:
        match = self.ITER.fullmatch(view.name)
        ours = int(match.group(1)) if match else None
        tracked = (view.sibling_text(self.TRACKER, 64) or "").strip()
        if ours is None or not tracked.isdigit() or int(tracked) < ours:
            return Verdict(False, f"{self.TRACKER} to reach {ours}" + (f" (it holds {tracked})" if tracked else ""))
        return _members_whole(view)


class Orbax(Layout):
    name = "orbax"
    recognised_by = "`_CHECKPOINT_METADATA` or `commit_success.txt` in a step directory (JAX)"
    complete_when = ("`commit_success.txt` is present, or `_CHECKPOINT_METADATA` holds a `commit_timestamp_nsecs`; "
                     "Orbax writes both at commit, after every item (on local disks its temporary "
                     "`*.orbax-checkpoint-tmp*` directory is renamed into place after that)")

    METADATA = "_CHECKPOINT_METADATA"
    COMMIT = "commit_success.txt"

    def claims(self, dirname: str, names: frozenset[str], holds_weights: bool) -> bool:
        return self.METADATA in names or self.COMMIT in names

    def check(self, view: DirView) -> Verdict:
        if self.COMMIT not in view.members:
            try:  # object stores: _CHECKPOINT_METADATA comes first, its commit time only at commit
                committed = json.loads(view.read_text(self.METADATA, 1 << 20) or "").get("commit_timestamp_nsecs")
            except (ValueError, AttributeError):
                committed = None
            if not committed:
                return Verdict(False, f"{self.COMMIT} or a commit time in {self.METADATA}")
        return _members_whole(view)


class Marker(Layout):
    name = "marker"
    recognised_by = "a marker file (`STABLE`, `COMMITTED`, `_SUCCESS`, or `--ready-marker NAME`)"
    complete_when = "the marker is present (write it last)"

    def __init__(self, markers: Sequence[str], hold_step_dirs: bool) -> None:
        self.markers = tuple(dict.fromkeys([*markers, *DEFAULT_MARKERS]))
        self.hold_step_dirs = hold_step_dirs

    def claims(self, dirname: str, names: frozenset[str], holds_weights: bool) -> bool:
        if any(m in names for m in self.markers):
            return True
        return self.hold_step_dirs and (step_named(dirname) or holds_weights)

    def check(self, view: DirView) -> Verdict:
        if not any(m in view.members for m in self.markers):
            return Verdict(False, " or ".join(self.markers))
        return _members_whole(view)


class SettleOnly(Layout):
    name = "dir"
    recognised_by = "with `--layout dir`: a step-named directory or one holding a file the filter matches"
    complete_when = "no member is incomplete by its format and none changed for `--settle` seconds"
    settle_only = True

    def claims(self, dirname: str, names: frozenset[str], holds_weights: bool) -> bool:
        return step_named(dirname) or holds_weights

    def check(self, view: DirView) -> Verdict:
        if not view.members:
            return Verdict(False, "its first file")
        return _members_whole(view)


WRITERS: tuple[Layout, ...] = (Megatron(), DeepSpeed(), DistributedCheckpoint(), HuggingFace(), Orbax())
"""Auto-detected in this order: Megatron's torch_dist directories hold DCP files, so they come first."""

SETTLE_ONLY = SettleOnly()


class Resolver:
    """Decides, for one watch, which directories are checkpoints and under which layout."""

    def __init__(self, layout: str = "auto", markers: Sequence[str] = ()) -> None:
        if layout not in LAYOUTS:
            raise ValueError(f"unknown layout {layout!r}")
        self.layout = layout
        forced = {lay.name: lay for lay in WRITERS}
        self.marker = Marker(markers, hold_step_dirs=bool(markers) or layout == "marker")
        forced.update({"marker": self.marker, "dir": SETTLE_ONLY})
        self._forced = forced.get(layout)

    @property
    def files_are_checkpoints(self) -> bool:
        """Loose files (not inside a directory checkpoint) are checkpoints with ``auto`` and ``file`` only."""
        return self.layout in ("auto", "file")

    def resolve(self, dirname: str, names: frozenset[str], holds_weights: bool) -> Layout | None:
        """The layout of a directory, or None when it is a plain folder to look inside."""
        if self.layout == "file":
            return None
        if self._forced is not None:
            if self._forced.claims(dirname, names, holds_weights) or (step_named(dirname) and bool(names)):
                return self._forced
            return None
        for layout in (*WRITERS, self.marker):
            if layout.claims(dirname, names, holds_weights):
                return layout
        return None


def table() -> list[tuple[str, str, str]]:
    """(layout, recognised by, complete when) for every directory layout, as the README shows them."""
    return [(lay.name, lay.recognised_by, lay.complete_when) for lay in (*WRITERS, Marker((), False), SETTLE_ONLY)]
