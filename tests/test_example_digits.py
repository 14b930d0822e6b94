"""The digits example (train.py, eval.py) and the SLURM submit-only evaluator."""

from __future__ import annotations

import importlib.util
import os
import stat
import zipfile
from pathlib import Path
from types import ModuleType, SimpleNamespace

import pytest
from harness import built_once

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def load(path: Path) -> ModuleType:
    """A fresh module object from a file path, the way Assayer loads an evaluator reference."""
    spec = importlib.util.spec_from_file_location(f"_test_{path.stem}_{id(path)}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    """Two epochs of training, once for the whole test run (a few seconds on CPU); read only."""

    def train(out: Path) -> None:
        assert load(EXAMPLES / "digits" / "train.py").main(["--out", str(out), "--epochs", "2", "--device", "cpu"]) == 0

    out = built_once(tmp_path_factory, "digits", train)
    return out, sorted(out.rglob("*.pt"))


@pytest.fixture
def evaluator(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    monkeypatch.setenv("DIGITS_DEVICE", "cpu")
    return load(EXAMPLES / "digits" / "eval.py")


@pytest.mark.torch
def test_train_writes_a_checkpoint_per_epoch_a_subdir_and_last(run: tuple[Path, list[Path]]) -> None:
    import torch

    out, _ = run
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert files == ["epoch=000-step=0023.pt", "last.ckpt", "sub/epoch=001-step=0046.pt"]
    for name in files:
        assert zipfile.is_zipfile(out / name), f"{name} is not a torch.save zip archive"
    last = torch.load(out / "last.ckpt", weights_only=True)
    assert (last["epoch"], last["step"]) == (1, 46)
    assert set(last["model"]) == set(torch.load(out / files[0], weights_only=True)["model"])


@pytest.mark.torch
def test_eval_scores_held_out_digits_well_above_chance(run: tuple[Path, list[Path]], evaluator: ModuleType) -> None:
    _, (first, second) = run
    early, later = evaluator.evaluate(first), evaluator.evaluate(str(second))

    for metrics in (early, later):
        assert set(metrics) == {"loss", "accuracy"}
        assert all(type(value) is float for value in metrics.values())
    assert later["accuracy"] > 0.8  # chance is 0.1; seeds 0-5 all give 0.87-0.93 after two epochs
    assert later["loss"] < early["loss"]


@pytest.mark.torch
def test_eval_builds_dataset_and_model_once_per_process(run: tuple[Path, list[Path]], evaluator: ModuleType) -> None:
    _, checkpoints = run
    assert evaluator.stats == {"dataset_loads": 0, "model_builds": 0}, "importing must not load data"

    evaluator.evaluate(checkpoints[0])
    held_out, model = evaluator._cache["x"], evaluator._cache["model"]
    evaluator.evaluate(checkpoints[1])

    assert evaluator.stats == {"dataset_loads": 1, "model_builds": 1}
    assert evaluator._cache["x"] is held_out and evaluator._cache["model"] is model


@pytest.mark.torch
def test_eval_takes_the_assayer_context(run: tuple[Path, list[Path]], evaluator: ModuleType) -> None:
    out, checkpoints = run
    ctx = SimpleNamespace(watch="digits", checkpoint=str(out / "last.ckpt"), step=None, attempt=1)
    assert evaluator.evaluate(out / "last.ckpt", ctx) == evaluator.evaluate(checkpoints[-1])


def fake_sbatch(bin_dir: Path, script: str) -> None:
    bin_dir.mkdir(exist_ok=True)
    path = bin_dir / "sbatch"
    path.write_text(f"#!/bin/sh\n{script}\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


def test_slurm_evaluator_submits_and_returns_the_job_id(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_sbatch(tmp_path / "bin", f'printf "%s\\n" "$@" > {tmp_path}/argv; echo "4242;cluster"')
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("SLURM_EVAL_SBATCH_ARGS", "--partition=eval --time=1:00:00")
    slurm = load(EXAMPLES / "slurm" / "eval_sbatch.py")

    result = slurm.evaluate("/ckpt/step 100", SimpleNamespace(watch="llm", step=100))

    assert result == {"slurm_job_id": "4242"}
    argv = (tmp_path / "argv").read_text().splitlines()
    assert argv[:3] == ["--parsable", "--job-name=assayer-llm", "--output=/ckpt/step 100.slurm-%j.log"]
    assert argv[3:5] == ["--partition=eval", "--time=1:00:00"]
    assert argv[5] == "--wrap" and "pretrained='/ckpt/step 100'" in argv[6]


def test_slurm_evaluator_explains_a_missing_or_failing_sbatch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    slurm = load(EXAMPLES / "slurm" / "eval_sbatch.py")
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    with pytest.raises(RuntimeError, match="sbatch not found on PATH"):
        slurm.evaluate("/ckpt/step_1")

    fake_sbatch(tmp_path / "bin", 'echo "sbatch: error: invalid partition" >&2; exit 1')
    with pytest.raises(RuntimeError, match="sbatch exited 1: sbatch: error: invalid partition"):
        slurm.evaluate("/ckpt/step_1")
