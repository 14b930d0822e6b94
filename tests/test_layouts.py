"""Directory checkpoints found by the scanner, written by the real writers (transformers, torch DCP, Lightning).

DeepSpeed, Megatron and Orbax cannot run on a CPU here: ``layout_writers`` writes their layouts
as their code does (each function names the writer, its version and the source it follows).
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any

import pytest
from harness import built_once
from layout_writers import (
    deepspeed_latest,
    megatron_tracker,
    orbax_commit,
    write_deepspeed,
    write_megatron,
    write_orbax,
)
from writers import save_dcp, save_pretrained_sharded, torch_bytes, train_hf, train_lightning, write_atomically

from assayer.layouts import Resolver, dir_step
from assayer.scan import Candidate, Scanner, ScanReport


def scan_later(scanner: Scanner, seconds: float = 3600) -> ScanReport:
    """Scan as if long after the last write (past every quiet and settle time)."""
    return scanner.scan(time.time() + seconds)


def found(report: ScanReport) -> dict[str, Candidate]:
    return {c.relpath: c for c in report.ready}


def hand_over(scanner: Scanner) -> set[str]:
    report = scan_later(scanner)
    for c in report.ready:
        scanner.mark_done(c.relpath, c.version)
    return {c.relpath for c in report.ready}


@pytest.fixture(scope="module")
def hf_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One real Trainer run, once for the whole test run: 12 steps, a checkpoint every 4, at most 2 kept
    (save_total_limit). Read only: tests copy what they change."""
    return built_once(tmp_path_factory, "hf", lambda root: train_hf(root / "out", max_steps=12, save_steps=4,
                                                                    save_total_limit=2)) / "out"


def test_trainer_checkpoints_are_directories_evaluated_whole_never_their_files(hf_run: Path) -> None:
    report = scan_later(Scanner(str(hf_run)))
    assert sorted(found(report)) == ["checkpoint-12", "checkpoint-8"]  # checkpoint-4 rotated away by the limit
    for cand in report.ready:
        assert cand.layout == "hf" and cand.path == str(hf_run / cand.relpath)
        assert cand.step == int(cand.relpath.split("-")[1])
    assert {"optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json"} <= set(os.listdir(hf_run / "checkpoint-8"))


def test_trainer_checkpoint_waits_for_trainer_state_written_last(hf_run: Path, tmp_path: Path) -> None:
    partial = tmp_path / "run" / "checkpoint-8"
    shutil.copytree(hf_run / "checkpoint-8", partial)
    state = (partial / "trainer_state.json").read_bytes()
    (partial / "trainer_state.json").unlink()
    scanner = Scanner(str(tmp_path / "run"))
    report = scan_later(scanner)
    assert report.ready == [] and report.pending == ["checkpoint-8"]
    assert "trainer_state.json" in report.waiting["checkpoint-8"]
    (partial / "trainer_state.json").write_bytes(state)
    assert sorted(found(scan_later(scanner))) == ["checkpoint-8"]


def test_renamed_into_place_counts_and_temp_directories_are_ignored(hf_run: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(hf_run / "checkpoint-8", run / "tmp-checkpoint-8")
    shutil.copytree(hf_run / "checkpoint-8", run / "checkpoint-9.tmp")
    scanner = Scanner(str(run))
    assert hand_over(scanner) == set()
    os.rename(run / "tmp-checkpoint-8", run / "checkpoint-8")
    assert hand_over(scanner) == {"checkpoint-8"}


def test_sharded_save_pretrained_waits_for_every_shard_the_index_names(tmp_path: Path) -> None:
    model = tmp_path / "run" / "export"
    shards = save_pretrained_sharded(model, max_shard_size="100KB")
    assert len(shards) >= 3
    last = model / shards[-1]
    data = last.read_bytes()
    last.unlink()
    scanner = Scanner(str(tmp_path / "run"))
    report = scan_later(scanner)
    assert report.ready == [] and report.waiting["export"] == f"{len(shards) - 1} of {len(shards)} shards"
    last.write_bytes(data[: len(data) // 2])  # the late shard, half written: complete by its header only
    assert scan_later(scanner).waiting["export"] == f"{len(shards) - 1} of {len(shards)} shards"
    last.write_bytes(data)
    cand = found(scan_later(scanner))["export"]
    assert cand.layout == "hf" and cand.step is None


def test_shards_without_their_index_wait_for_it(tmp_path: Path) -> None:
    model = tmp_path / "run" / "export"
    shards = save_pretrained_sharded(model, max_shard_size="100KB")
    index = (model / "model.safetensors.index.json").read_bytes()
    (model / "model.safetensors.index.json").unlink()
    scanner = Scanner(str(tmp_path / "run"))
    assert scan_later(scanner).waiting["export"] == f"{len(shards)} of {len(shards)} shards and the index"
    (model / "model.safetensors.index.json").write_bytes(index)
    assert list(found(scan_later(scanner))) == ["export"]


def test_dcp_directory_is_complete_once_metadata_is_written(tmp_path: Path) -> None:
    run = tmp_path / "run"
    save_dcp(run / "step-500")
    assert sorted(os.listdir(run / "step-500")) == [".metadata", "__0_0.distcp"]
    metadata = (run / "step-500" / ".metadata").read_bytes()
    (run / "step-500" / ".metadata").unlink()  # as it is before the coordinator's last write
    scanner = Scanner(str(run))
    report = scan_later(scanner)
    assert report.ready == [] and report.waiting["step-500"].startswith(".metadata")
    (run / "step-500" / ".metadata").write_bytes(metadata)
    cand = found(scan_later(scanner))["step-500"]
    assert (cand.layout, cand.step) == ("dcp", 500)


def test_lightning_checkpoints_stay_file_checkpoints(tmp_path: Path) -> None:
    folder = train_lightning(tmp_path / "lightning", max_steps=6, every_n_train_steps=2)
    report = scan_later(Scanner(str(tmp_path / "lightning")))
    names = sorted(os.path.basename(c.relpath) for c in report.ready)
    assert names == ["epoch=0-step=2.ckpt", "epoch=0-step=4.ckpt", "epoch=0-step=6.ckpt"]
    assert all(c.layout == "file" and os.path.dirname(c.path) == str(folder) for c in report.ready)


def test_deepspeed_tag_waits_for_latest_to_name_it(tmp_path: Path) -> None:
    save_dir = tmp_path / "ds"
    tag = write_deepspeed(save_dir, 500, write_latest=False)
    scanner = Scanner(str(save_dir))
    report = scan_later(scanner)
    assert report.ready == [] and "'latest' to name global_step500" in report.waiting["global_step500"]
    deepspeed_latest(save_dir, tag.name)
    cand = found(scan_later(scanner))["global_step500"]
    assert (cand.layout, cand.step) == ("deepspeed", 500)
    write_deepspeed(save_dir, 1000)  # the next save names itself in latest; 500 stays complete
    assert hand_over(scanner) == {"global_step500", "global_step1000"}


def test_deepspeed_latest_before_another_ranks_shard_is_not_complete(tmp_path: Path) -> None:
    """Rank 0 writes ``latest`` before the barrier: a rank still writing (or not yet started) must be waited for."""
    save_dir = tmp_path / "ds"
    tag = write_deepspeed(save_dir, 200, dp_ranks=3)
    shard = tag / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    data = shard.read_bytes()
    shard.unlink()
    scanner = Scanner(str(save_dir))
    assert scan_later(scanner).waiting["global_step200"] == "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    shard.write_bytes(data[:-30])  # being written in place by torch.save
    assert "still being written" in scan_later(scanner).waiting["global_step200"]
    shard.write_bytes(data)
    assert list(found(scan_later(scanner))) == ["global_step200"]


def test_megatron_iteration_waits_for_the_tracker(tmp_path: Path) -> None:
    save_dir = tmp_path / "megatron"
    write_megatron(save_dir, 500, fmt="torch", write_tracker=False)
    write_megatron(save_dir, 1000, fmt="torch_dist", write_tracker=False)
    scanner = Scanner(str(save_dir))
    report = scan_later(scanner)
    assert report.ready == [] and set(report.waiting) == {"iter_0000500", "iter_0001000"}
    megatron_tracker(save_dir, 500)
    cand = found(scan_later(scanner))["iter_0000500"]
    assert (cand.layout, cand.step) == ("megatron", 500)
    megatron_tracker(save_dir, 1000)
    assert {c.relpath: c.layout for c in scan_later(scanner).ready}["iter_0001000"] == "megatron"


def test_orbax_step_counts_once_finalized(tmp_path: Path) -> None:
    root = tmp_path / "orbax"
    tmp_dir = write_orbax(root, 500, commit=False)
    scanner = Scanner(str(root))
    assert hand_over(scanner) == set()  # the tmp directory is never a checkpoint
    orbax_commit(tmp_dir)
    cand = found(scan_later(scanner))["500"]
    assert (cand.layout, cand.step) == ("orbax", 500)
    gcs = write_orbax(root / "object-store", 700, object_store=True, commit=False)
    report = scan_later(scanner)
    assert "object-store/700" in report.waiting
    orbax_commit(gcs)
    assert "object-store/700" in found(scan_later(scanner))


def test_marker_written_before_its_files_are_whole_still_waits_for_them(tmp_path: Path) -> None:
    run = tmp_path / "run"
    step = run / "step_300"
    step.mkdir(parents=True)
    data = torch_bytes(1, size=20_000)
    (step / "model.pt").write_bytes(data[: len(data) // 3])  # still being written in place
    scanner = Scanner(str(run), markers=["COMMITTED"])
    report = scan_later(scanner)
    assert report.ready == [] and "COMMITTED" in report.waiting["step_300"]
    (step / "COMMITTED").touch()  # a marker that came before its files were whole
    assert scan_later(scanner).waiting["step_300"] == "model.pt still being written"
    (step / "model.pt").write_bytes(data)
    cand = found(scan_later(scanner))["step_300"]
    assert (cand.layout, cand.step) == ("marker", 300)


def test_default_markers_are_recognised_without_a_flag(tmp_path: Path) -> None:
    (tmp_path / "exp" / "snapshot").mkdir(parents=True)
    (tmp_path / "exp" / "snapshot" / "weights.bin").write_bytes(b"w" * 100)
    (tmp_path / "exp" / "snapshot" / "_SUCCESS").touch()
    cand = found(scan_later(Scanner(str(tmp_path))))["exp/snapshot"]
    assert cand.layout == "marker"


def test_quiet_time_after_the_marker_and_settle_time_for_the_dir_layout(tmp_path: Path) -> None:
    save_dcp(tmp_path / "step-1")
    newest = max(p.stat().st_mtime for p in (tmp_path / "step-1").iterdir())
    scanner = Scanner(str(tmp_path), settle=2.0, quiet=0.2)
    report = scanner.scan(newest + 0.05)
    assert report.ready == [] and report.next_check == pytest.approx(newest + 0.2)
    assert list(found(scanner.scan(newest + 0.25))) == ["step-1"]
    generic = tmp_path / "generic"
    (generic / "snap-7").mkdir(parents=True)
    (generic / "snap-7" / "weights.pt").write_bytes(torch_bytes())
    newest = (generic / "snap-7" / "weights.pt").stat().st_mtime
    settle_only = Scanner(str(generic), settle=2.0, layout="dir")
    assert settle_only.scan(newest + 1.0).ready == []
    assert list(found(settle_only.scan(newest + 2.1))) == ["snap-7"]


def test_rewritten_directory_is_a_new_version_and_a_deleted_one_is_forgotten(tmp_path: Path) -> None:
    run = tmp_path / "run"
    save_dcp(run / "step-5", seed=1)
    scanner = Scanner(str(run))
    first = found(scan_later(scanner))["step-5"]
    scanner.mark_done("step-5", first.version)
    assert scan_later(scanner).ready == []
    shutil.rmtree(run / "step-5")
    save_dcp(run / "step-5", seed=2)  # the trainer saved the same step again
    second = found(scan_later(scanner))["step-5"]
    assert second.version != first.version
    scanner.mark_done("step-5", second.version)
    shutil.rmtree(run / "step-5")
    report = scan_later(scanner)
    assert report.ready == [] and report.pending == [] and report.files == 0


def test_nested_runs_plain_files_beside_directories_and_forced_file_layout(hf_run: Path, tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    shutil.copytree(hf_run / "checkpoint-8", runs / "exp1" / "checkpoint-8")
    shutil.copytree(hf_run / "checkpoint-12", runs / "exp2" / "checkpoint-12")
    write_atomically(runs / "exp1" / "last.ckpt", torch_bytes(3))
    got = {rel: c.layout for rel, c in found(scan_later(Scanner(str(runs)))).items()}
    assert got == {"exp1/checkpoint-8": "hf", "exp2/checkpoint-12": "hf", "exp1/last.ckpt": "file"}
    as_files = {c.relpath for c in scan_later(Scanner(str(runs), layout="file")).ready}
    assert "exp1/checkpoint-8/optimizer.pt" in as_files and "exp1/checkpoint-8" not in as_files
    hf_only = {c.relpath for c in scan_later(Scanner(str(runs), layout="hf")).ready}
    assert hf_only == {"exp1/checkpoint-8", "exp2/checkpoint-12"}  # forced layouts evaluate directories only


def test_a_regex_of_the_users_selects_directories_by_their_path_or_their_files(hf_run: Path, tmp_path: Path) -> None:
    for exp in ("exp1", "exp2"):
        shutil.copytree(hf_run / "checkpoint-8", tmp_path / exp / "checkpoint-8")
    assert {c.relpath for c in scan_later(Scanner(str(tmp_path), regex="/exp2/")).ready} == {"exp2/checkpoint-8"}
    by_file = {c.relpath for c in scan_later(Scanner(str(tmp_path), regex=r"\.safetensors$")).ready}
    assert by_file == {"exp1/checkpoint-8", "exp2/checkpoint-8"}  # never optimizer.pt or model.safetensors alone


def test_a_handed_over_cold_directory_costs_one_stat(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for i in range(20):
        save_dcp(tmp_path / f"step-{i}")
    old = time.time() - 7200
    for p in tmp_path.rglob("*"):
        os.utime(p, (old, old))
    scanner = Scanner(str(tmp_path), full_scan_interval=3600, hot_window=600)
    assert len(hand_over(scanner)) == 20
    calls: list[str] = []
    real_stat, real_scandir = os.stat, os.scandir

    def counted_stat(path: Any, *args: Any, **kwargs: Any) -> os.stat_result:
        calls.append(path)
        return real_stat(path, *args, **kwargs)

    def counted_scandir(path: Any) -> Any:
        calls.append(f"list {path}")
        return real_scandir(path)

    monkeypatch.setattr(os, "stat", counted_stat)
    monkeypatch.setattr(os, "scandir", counted_scandir)
    scanner.scan(time.time())
    assert len(calls) == 21  # the root and each checkpoint directory, nothing listed or read


@pytest.mark.parametrize(("name", "step"), [
    ("checkpoint-500", 500), ("global_step500", 500), ("iter_0000500", 500), ("step-500", 500),
    ("step500-unsharded", 500), ("500", 500), ("step_300", 300), ("best", None), ("model-00001-of-00004", None),
])
def test_step_comes_from_the_directory_name(name: str, step: int | None) -> None:
    assert dir_step(name) == step


def test_resolver_auto_detects_each_writer_from_its_entries() -> None:
    resolve = Resolver().resolve
    cases = {
        ("checkpoint-5", frozenset()): "hf",
        ("export", frozenset({"config.json", "model.safetensors"})): "hf",
        ("step-5", frozenset({"__0_0.distcp"})): "dcp",
        ("global_step5", frozenset()): "deepspeed",
        ("tag", frozenset({"mp_rank_00_model_states.pt"})): "deepspeed",
        ("iter_0000005", frozenset({".metadata", "__0_0.distcp"})): "megatron",
        ("5", frozenset({"_CHECKPOINT_METADATA", "default"})): "orbax",
        ("snap", frozenset({"COMMITTED", "w.pt"})): "marker",
    }
    for (name, names), layout in cases.items():
        got = resolve(name, names, False)
        assert got is not None and got.name == layout, (name, names)
    assert resolve("logs", frozenset({"events.out"}), False) is None
    assert resolve("step-5", frozenset({"model.pt"}), True) is None  # plain folder: its files stay file checkpoints


def test_the_readme_table_states_each_layouts_rule_as_the_code_does() -> None:
    from assayer.layouts import table

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    for name, recognised_by, complete_when in table():
        assert f"| `{name}` | {recognised_by} | {complete_when} |" in readme, name
