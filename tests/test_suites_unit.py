"""Evaluation suites in process: evaluator versions and names, suites, the ledger's slots, backfill, results.

A real Redis and no worker processes: what each evaluator of a watch gets queued, where and how
often, is decided by the ledger and can be held here directly, many cases over.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import redis
from harness import invoke
from rq.job import Job
from rq.serializers import JSONSerializer
from writers import zip_bytes

from assayer import evaluator, jobs, keys, ledger, records, results, watches
from assayer.errors import ConfigError, WatchError
from assayer.rq_internals import queue_key
from assayer.scan import Candidate
from assayer.settings import Settings
from assayer.watches import Evaluator, Suite, WatchSpec

SOURCE = "def {fn}(path):\n    return {{'{metric}': {value}}}\n"


def write_evaluator(path: Path, *lines: str) -> str:
    """A .py file of the given lines; returns its path as a string."""
    path.write_text("".join(line + "\n" for line in lines))
    return str(path)


def evaluators_dir(tmp_path: Path) -> Path:
    """Two evaluator files: loss.py (loss) and acc.py (acc), each undeclared (versioned by source hash)."""
    folder = tmp_path / "evals"
    folder.mkdir(exist_ok=True)
    (folder / "loss.py").write_text(SOURCE.format(fn="loss", metric="loss", value=1.0))
    (folder / "acc.py").write_text(SOURCE.format(fn="acc", metric="acc", value=0.5))
    return folder


def suite_spec(tmp_path: Path, names: str = "loss,acc", pools: Any = (), name: str = "run",
               eval_existing: bool = True, order: str = "newest") -> WatchSpec:
    folder = evaluators_dir(tmp_path) if not (tmp_path / "evals").exists() else tmp_path / "evals"
    refs = [f"{n}={folder / n}.py:{n}" for n in names.split(",")]
    spec, _ = watches.build_spec(str(tmp_path / "run"), refs, name=name, eval_existing=eval_existing,
                                 suite=Suite(pools, order=order))
    return spec


def add(conn: redis.Redis, settings: Settings, spec: WatchSpec) -> WatchSpec:
    Path(spec.directory).mkdir(parents=True, exist_ok=True)
    assert watches.register(conn, settings, spec) in ("added", "updated")
    return watches.require(conn, spec.name)


def write_checkpoints(spec: WatchSpec, count: int) -> list[Path]:
    root = Path(spec.directory)
    root.mkdir(parents=True, exist_ok=True)
    paths = [root / f"step_{(i + 1) * 100}.pt" for i in range(count)]
    for i, path in enumerate(paths):
        path.write_bytes(zip_bytes(i))
    return paths


def ready(spec: WatchSpec, settings: Settings) -> list[Candidate]:
    """What a scan long after the last write hands over."""
    return spec.scanner(settings).scan(time.time() + 3600).ready


def queued(conn: redis.Redis, queue: str) -> list[dict[str, Any]]:
    """The keyword arguments of each job waiting in ``queue``."""
    ids = [keys.text(raw) for raw in conn.lrange(queue_key(queue), 0, -1)]
    return [Job.fetch(i, connection=conn, serializer=JSONSerializer).kwargs for i in ids]


def slots(conn: redis.Redis, spec: WatchSpec, relpath: str) -> dict[str, records.Slot]:
    (entry,) = ledger.entries(conn, spec.name, [relpath], spec.first)
    assert entry is not None, f"no ledger entry for {relpath}"
    return entry.evals


def edit(path: str, extra: str = "# edited\n") -> None:
    """Change an evaluator's source (and its size, so the version cache sees it in the same mtime tick)."""
    with open(path, "a") as fh:
        fh.write(extra)


# -- evaluator versions ----------------------------------------------------------------------------


def test_a_declared_function_version_beats_the_module_version_which_beats_the_source_hash(tmp_path: Path) -> None:
    declared = write_evaluator(tmp_path / "declared.py", "__version__ = '1.0'", "def run(path):", "    return {}",
                               "run.version = '2024-06'", "def other(path):", "    return {}")
    assert evaluator.version_of(f"{declared}:run") == "2024-06"
    assert evaluator.version_of(f"{declared}:other") == "1.0"  # no fn.version of its own: the module's
    plain = write_evaluator(tmp_path / "plain.py", "def run(path):", "    return {}")
    digest = hashlib.sha256(Path(plain).read_bytes()).hexdigest()[:12]
    assert evaluator.version_of(f"{plain}:run") == f"src-{digest}"
    numbered = write_evaluator(tmp_path / "numbered.py", "def run(path):", "    return {}", "run.version = 3")
    assert evaluator.version_of(f"{numbered}:run") == "3"
    assert evaluator.version_of(f"{tmp_path / 'gone.py'}:run") == "unknown"


def test_versions_asked_from_many_threads_parse_one_source_at_a_time(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # CPython keeps the AST constructor's recursion depth in shared state: two threads in ast.parse at
    # once can fail with "SystemError: AST constructor recursion depth mismatch" (python/cpython#106905),
    # as the ledger's concurrent offers did once in a full run. Each parse here lingers, so that
    # without the lock the eight threads would be inside ast.parse together.
    import ast

    inside, most = 0, 0
    count = threading.Lock()
    parse = ast.parse

    def lingering_parse(source: Any, *args: Any, **kwargs: Any) -> Any:
        nonlocal inside, most
        with count:
            inside += 1
            most = max(most, inside)
        try:
            time.sleep(0.05)
            return parse(source, *args, **kwargs)
        finally:
            with count:
                inside -= 1

    monkeypatch.setattr(ast, "parse", lingering_parse)
    refs = [f"{write_evaluator(tmp_path / f'e{i}.py', 'def run(path):', f'    return {{{i}: 1}}')}:run" for i in range(8)]
    got: dict[str, str] = {}
    threads = [threading.Thread(target=lambda r=ref: got.__setitem__(r, evaluator.version_of(r))) for ref in refs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(got) == 8 and all(v.startswith("src-") for v in got.values())
    assert most == 1


def test_editing_an_undeclared_evaluator_changes_its_version_and_a_declared_one_keeps_it(tmp_path: Path) -> None:
    plain = write_evaluator(tmp_path / "plain.py", "def run(path):", "    return {'a': 1}")
    declared = write_evaluator(tmp_path / "declared.py", "def run(path):", "    return {'a': 1}", "run.version = 'v1'")
    before = evaluator.version_of(f"{plain}:run")
    edit(plain, "# a comment is a change too: the hash is of the whole file\n")
    edit(declared)
    after = evaluator.version_of(f"{plain}:run")
    assert after.startswith("src-") and after != before
    assert evaluator.version_of(f"{declared}:run") == "v1"  # the author says when results change


def test_a_module_reference_is_versioned_from_its_source_without_importing_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    package = tmp_path / "lib" / "suite_pkg_7f3"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    write_evaluator(package / "evals.py", "raise RuntimeError('imported')", "__version__ = '0.3'",
                    "def mmlu(path):", "    return {}")
    monkeypatch.syspath_prepend(str(tmp_path / "lib"))
    assert evaluator.version_of("suite_pkg_7f3.evals.mmlu") == "0.3"
    assert evaluator.version_of("suite_pkg_7f3.evals:mmlu") == "0.3"
    assert "suite_pkg_7f3.evals" not in sys.modules  # a watch worker never runs evaluator code
    assert evaluator.version_of("suite_pkg_7f3.nowhere.fn") == "unknown"
    sys.modules.pop("suite_pkg_7f3", None)  # its parent package was imported to find it: not left for other tests


@pytest.mark.parametrize("kind", ["file", "module"])
def test_an_evaluator_rewritten_within_the_second_to_the_same_size_runs_its_new_code(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    """Python would take the first version's .pyc for current (same size, same mtime in whole seconds)."""
    monkeypatch.setattr(sys, "dont_write_bytecode", False)  # as Python runs unless told otherwise: .pyc written
    package = tmp_path / "lib" / f"suite_pkg_{kind}_a91"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    source = package / "evals.py"
    ref = f"{source}:run" if kind == "file" else f"suite_pkg_{kind}_a91.evals.run"
    monkeypatch.syspath_prepend(str(tmp_path / "lib"))
    try:
        source.write_text("def run(path):\n    return {'tag': 'v1'}\n")
        assert evaluator.load(ref)("x") == {"tag": "v1"}
        first = source.stat()
        source.write_text("def run(path):\n    return {'tag': 'v2'}\n")
        os.utime(source, ns=(first.st_atime_ns, first.st_mtime_ns + 1))  # the same second, one nanosecond on
        assert source.stat().st_size == first.st_size
        assert evaluator.version_of(ref) == "src-" + hashlib.sha256(source.read_bytes()).hexdigest()[:12]
        sys.modules.pop(f"suite_pkg_{kind}_a91.evals", None)  # a fresh evaluator process
        assert evaluator.load(ref)("x") == {"tag": "v2"}
    finally:
        for name in [n for n in sys.modules if n.startswith(f"suite_pkg_{kind}_a91")]:
            del sys.modules[name]


# -- evaluators and suites -------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "name", "ref"), [
    ("loss=eval.py:loss", "loss", "eval.py:loss"),
    ("mmlu = suites/lm.py:run", "mmlu", "suites/lm.py:run"),
    ("eval.py:evaluate", "evaluate", "eval.py:evaluate"),
    ("mylab.evals.lm.perplexity", "perplexity", "mylab.evals.lm.perplexity"),
    ("mylab.evals.lm:perplexity", "perplexity", "mylab.evals.lm:perplexity"),
    ("val-2.b=mylab.evals:run", "val-2.b", "mylab.evals:run"),
])
def test_an_evaluator_is_named_as_given_or_after_its_function(text: str, name: str, ref: str) -> None:
    assert Evaluator.parse(text) == Evaluator(name, ref, "default")


@pytest.mark.parametrize(("texts", "suite", "message", "fix"), [
    (["a=e.py:f", "a=e.py:g"], Suite(), "two evaluators are named a", "name each one"),
    (["x.py:run", "y.py:run"], Suite(), "two evaluators are named run", "name each one"),
    ([], Suite(), "needs at least one evaluator", "-e path/to/file.py:fn"),
    (["a=e.py:f"], Suite("GPU"), "pool name 'GPU' is not valid", "lower-case letters"),
    (["a=e.py:f"], Suite(("a=gpu_1",)), "pool name 'gpu_1' is not valid", "lower-case letters"),
    (["a=e.py:f", "b=e.py:g"], Suite(("mmlu=gpu",)), "no evaluator is named 'mmlu'", "evaluators of this watch: a, b"),
    (["a=e.py:f"], Suite({"nope": "gpu"}), "no evaluator is named 'nope'", "evaluators of this watch: a"),
    (["a=e.py:f"], Suite(every=0), "--every must be a whole number of steps >= 1, got 0", "--every 1000"),
    (["a=e.py:f"], Suite(every=True), "--every must be a whole number", "--every 1000"),
    (["a=e.py:f"], Suite(every="10"), "--every must be a whole number", "--every 1000"),  # type: ignore[arg-type]
    (["a=e.py:f"], Suite(order="random"), "order 'random' is not known", "newest, oldest"),
])
def test_bad_suites_are_refused_with_the_reason_and_a_fix(texts: list[str], suite: Suite, message: str,
                                                          fix: str) -> None:
    with pytest.raises(ConfigError) as caught:
        suite.evaluators(texts)
    assert message in caught.value.message and fix in (caught.value.hint or "")


def test_a_pool_goes_to_every_evaluator_or_to_the_one_named() -> None:
    texts = ["loss=e.py:loss", "mmlu=e.py:mmlu"]
    assert [e.pool for e in Suite("gpu").evaluators(texts)] == ["gpu", "gpu"]
    assert [e.pool for e in Suite(("mmlu=gpu",)).evaluators(texts)] == ["default", "gpu"]
    assert [e.pool for e in Suite(("gpu", "loss=cpu-small")).evaluators(texts)] == ["cpu-small", "gpu"]
    assert [e.pool for e in Suite({"mmlu": "a100-80g"}).evaluators(texts)] == ["default", "a100-80g"]


@pytest.mark.parametrize(("args", "message", "fix"), [
    (["-e", "a={evals}/loss.py:loss", "-e", "a={evals}/acc.py:acc"], "two evaluators are named a",
     "fix: name each one"),
    (["-e", "{evals}/loss.py:loss", "--pool", "acc=gpu"], "no evaluator is named 'acc'",
     "fix: evaluators of this watch: loss"),
    (["-e", "{evals}/loss.py:loss", "--pool", "GPU"], "pool name 'GPU' is not valid", "fix: use lower-case"),
    (["-e", "{evals}/loss.py:loss", "--every", "0"], "Invalid value for '--every'", "0 is not in the range x>=1"),
    (["-e", "{evals}/loss.py:loss", "--order", "random"], "Invalid value for '--order'", "'newest', 'oldest'"),
])
def test_watch_add_refuses_a_bad_suite_with_exit_code_2_and_registers_nothing(
    conn: redis.Redis, settings: Settings, tmp_path: Path, args: list[str], message: str, fix: str
) -> None:
    folder = evaluators_dir(tmp_path)
    out = invoke(settings, "watch", "add", str(tmp_path / "run"), "--name", "run",
                 *[a.format(evals=folder) for a in args])
    assert out.returncode == 2, out.stdout + out.stderr
    assert message in out.stderr and fix in out.stderr, out.stderr
    assert conn.hlen(keys.WATCHES) == 0


def test_watch_add_names_each_evaluator_and_its_pool(conn: redis.Redis, settings: Settings, tmp_path: Path) -> None:
    folder = evaluators_dir(tmp_path)
    out = invoke(settings, "watch", "add", str(tmp_path / "run"), "--name", "run", "-e", f"{folder}/loss.py:loss",
                 "-e", f"accuracy={folder}/acc.py:acc", "--pool", "accuracy=gpu", "--no-backfill", "--order", "oldest",
                 "--every", "500")
    assert out.returncode == 0, out.stderr
    spec = watches.require(conn, "run")
    assert [(e.name, e.pool) for e in spec.evaluators] == [("loss", "default"), ("accuracy", "gpu")]
    assert (spec.backfill, spec.order, spec.every) == (False, "oldest", 500)
    assert spec.evaluator == f"{folder}/loss.py:loss"  # what one-evaluator readers show: the first


# -- the watches file ------------------------------------------------------------------------------


def test_the_watches_file_declares_evaluators_pools_and_options(
    conn: redis.Redis, settings: Settings, tmp_path: Path
) -> None:
    folder = evaluators_dir(tmp_path)
    (tmp_path / "run").mkdir()
    path = tmp_path / "watches.yaml"
    path.write_text(
        "watches:\n"
        "  - name: suite\n"
        f"    directory: {tmp_path / 'run'}\n"
        "    evaluators:\n"
        f"      - val={folder}/loss.py:loss\n"
        f"      - {{name: mmlu, ref: '{folder}/acc.py:acc', pool: gpu}}\n"
        f"      - {folder}/acc.py:acc\n"
        "    pools: {val: cpu-small}\n"
        "    backfill: false\n"
        "    order: oldest\n"
        "    every: 10\n"
        "  - name: everywhere\n"
        f"    directory: {tmp_path / 'run'}\n"
        f"    evaluators: ['{folder}/loss.py:loss']\n"
        "    pools: gpu\n"
    )
    watches.sync_file(conn, settings.replace(watches_file=path))
    spec = watches.require(conn, "suite")
    assert [(e.name, e.ref, e.pool) for e in spec.evaluators] == [
        ("val", f"{folder}/loss.py:loss", "cpu-small"), ("mmlu", f"{folder}/acc.py:acc", "gpu"),
        ("acc", f"{folder}/acc.py:acc", "default")]
    assert (spec.backfill, spec.order, spec.every) == (False, "oldest", 10)
    assert [e.pool for e in watches.require(conn, "everywhere").evaluators] == ["gpu"]

    text = path.read_text().replace("    backfill: false\n", "").replace(f"      - {folder}/acc.py:acc\n", "")
    path.write_text(text)
    watches.sync_file(conn, settings.replace(watches_file=path))  # a worker restarted with an edited file
    spec = watches.require(conn, "suite")
    assert [e.name for e in spec.evaluators] == ["val", "mmlu"] and spec.backfill


@pytest.mark.parametrize(("evaluators", "message"), [
    ("['{evals}/loss.py:loss', '{evals}/loss.py:loss']", "two evaluators are named loss"),
    ("[{{name: x}}]", "has no ref"),
    ("['{evals}/loss.py:loss']\n    pools: {{acc: gpu}}", "no evaluator is named 'acc'"),
    ("['{evals}/loss.py:loss']\n    pools: [gpu]", "must map evaluator names to pools"),
    ("['{evals}/loss.py:loss']\n    order: sideways", "order 'sideways' is not known"),
    ("['{evals}/loss.py:loss']\n    every: -5", "--every must be a whole number"),
])
def test_a_bad_suite_in_the_watches_file_skips_only_its_watch(
    conn: redis.Redis, settings: Settings, tmp_path: Path, caplog: pytest.LogCaptureFixture, evaluators: str,
    message: str,
) -> None:
    folder = evaluators_dir(tmp_path)
    (tmp_path / "run").mkdir()
    path = tmp_path / "watches.yaml"
    path.write_text(
        "watches:\n"
        f"  - name: good\n    directory: {tmp_path / 'run'}\n    evaluators: ['{folder}/loss.py:loss']\n"
        f"  - name: bad\n    directory: {tmp_path / 'run'}\n    evaluators: {evaluators.format(evals=folder)}\n"
    )
    with caplog.at_level(logging.ERROR, logger="assayer.watches"):
        watches.sync_file(conn, settings.replace(watches_file=path))
    assert [s.name for s in watches.all_specs(conn)] == ["good"]
    assert "skipping bad" in caplog.text and message in caplog.text


# -- the ledger ------------------------------------------------------------------------------------


def test_two_evaluators_queue_two_jobs_per_checkpoint_each_in_its_pools_queue_once(
    conn: redis.Redis, settings: Settings, tmp_path: Path
) -> None:
    spec = add(conn, settings, suite_spec(tmp_path, pools=("acc=gpu",)))
    write_checkpoints(spec, 3)
    ids = ledger.enqueue_new(conn, settings, spec, ready(spec, settings))
    assert len(ids) == len(set(ids)) == 6
    default, gpu = queued(conn, "assayer-eval"), queued(conn, "assayer-eval-gpu")
    current = ledger.versions(spec)
    assert sorted(j["relpath"] for j in default) == sorted(j["relpath"] for j in gpu) == [
        "step_100.pt", "step_200.pt", "step_300.pt"]
    assert {(j["evaluator_name"], j["pool"], j["evaluator_version"]) for j in default} == {
        ("loss", "default", current["loss"])}
    assert {(j["evaluator_name"], j["pool"], j["evaluator_version"]) for j in gpu} == {("acc", "gpu", current["acc"])}
    assert conn.scard(keys.pending("run")) == 6
    entry = slots(conn, spec, "step_100.pt")
    assert {n: s.ev for n, s in entry.items()} == current

    assert ledger.enqueue_new(conn, settings, spec, ready(spec, settings)) == []  # offered again: the ledger has it
    assert conn.llen(queue_key("assayer-eval")) == conn.llen(queue_key("assayer-eval-gpu")) == 3
    assert conn.llen(queue_key("assayer-eval-backfill")) == conn.llen(queue_key("assayer-eval-gpu-backfill")) == 0


def test_a_changed_evaluator_queues_only_its_own_jobs_again(
    conn: redis.Redis, settings: Settings, tmp_path: Path
) -> None:
    spec = add(conn, settings, suite_spec(tmp_path, pools=("acc=gpu",)))
    write_checkpoints(spec, 2)
    ledger.enqueue_new(conn, settings, spec, ready(spec, settings))
    before = slots(conn, spec, "step_100.pt")
    edit(str(tmp_path / "evals" / "acc.py"))
    again = ledger.enqueue_new(conn, settings, spec, ready(spec, settings))
    assert len(again) == 2 and conn.llen(queue_key("assayer-eval")) == 2 and conn.llen(queue_key("assayer-eval-gpu")) == 4
    after = slots(conn, spec, "step_100.pt")
    assert after["loss"] == before["loss"]  # untouched: same job, same version
    assert after["acc"].ev == evaluator.version_of(spec.evaluators[1].ref) != before["acc"].ev
    assert after["acc"].job in again and after["acc"].job != before["acc"].job
    assert ledger.enqueue_new(conn, settings, spec, ready(spec, settings)) == []


def test_backfill_queues_what_evaluated_checkpoints_lack_on_the_backfill_queues_once(
    conn: redis.Redis, settings: Settings, tmp_path: Path
) -> None:
    spec = add(conn, settings, suite_spec(tmp_path, names="loss"))
    write_checkpoints(spec, 4)
    first = ledger.enqueue_new(conn, settings, spec, ready(spec, settings))
    assert len(first) == 4 and ledger.backfill(conn, settings, spec) == []  # nothing lacking

    grown = suite_spec(tmp_path, pools=("acc=gpu",))
    assert watches.register(conn, settings, grown) == "updated"  # same directory, one more evaluator
    spec = watches.require(conn, "run")
    filled = ledger.backfill(conn, settings, spec)
    assert len(filled) == 4
    jobs_ = queued(conn, "assayer-eval-gpu-backfill")
    assert sorted(j["relpath"] for j in jobs_) == ["step_100.pt", "step_200.pt", "step_300.pt", "step_400.pt"]
    assert {j["evaluator_name"] for j in jobs_} == {"acc"}
    assert conn.llen(queue_key("assayer-eval-gpu")) == 0 and conn.llen(queue_key("assayer-eval")) == 4  # new work: as was
    assert jobs_[0]["relpath"] == "step_400.pt"  # order newest (the default): the newest is taken first
    assert ledger.backfill(conn, settings, spec) == []  # queued once
    assert ledger.enqueue_new(conn, settings, spec, ready(spec, settings)) == []  # a scan finds nothing to add
    assert slots(conn, spec, "step_100.pt")["loss"].job in first  # the first evaluator's slot is untouched


@pytest.mark.parametrize(("order", "expected"), [
    ("newest", ["step_300.pt", "step_200.pt", "step_100.pt"]),
    ("oldest", ["step_100.pt", "step_200.pt", "step_300.pt"]),
])
def test_backfill_takes_the_newest_first_unless_the_order_is_oldest(
    conn: redis.Redis, settings: Settings, tmp_path: Path, order: str, expected: list[str]
) -> None:
    spec = add(conn, settings, suite_spec(tmp_path, names="loss", order=order))
    write_checkpoints(spec, 3)
    ledger.enqueue_new(conn, settings, spec, ready(spec, settings))
    assert watches.register(conn, settings, suite_spec(tmp_path, order=order)) == "updated"
    assert len(ledger.backfill(conn, settings, watches.require(conn, "run"))) == 3
    assert [j["relpath"] for j in queued(conn, "assayer-eval-backfill")] == expected  # rq takes from the left


def test_backfill_skips_checkpoints_deleted_or_rewritten_since(
    conn: redis.Redis, settings: Settings, tmp_path: Path
) -> None:
    spec = add(conn, settings, suite_spec(tmp_path, names="loss"))
    paths = write_checkpoints(spec, 3)
    ledger.enqueue_new(conn, settings, spec, ready(spec, settings))
    paths[0].unlink()
    paths[1].write_bytes(zip_bytes(1234))  # a new version: the next scan queues it for every evaluator
    watches.register(conn, settings, suite_spec(tmp_path))
    spec = watches.require(conn, "run")
    filled = ledger.backfill(conn, settings, spec)
    assert [j["relpath"] for j in queued(conn, "assayer-eval-backfill")] == ["step_300.pt"] and len(filled) == 1
    rescanned = ledger.enqueue_new(conn, settings, spec, ready(spec, settings))
    assert len(rescanned) == 2  # step_200.pt's new version, once per evaluator, as new work
    assert {j["evaluator_name"] for j in queued(conn, "assayer-eval") if j["relpath"] == "step_200.pt"} == {
        "loss", "acc"}


def legacy(conn: redis.Redis, spec: WatchSpec, cand: Candidate, job: str) -> None:
    """A ledger entry as Assayer wrote it before evaluators had names and versions."""
    conn.hset(keys.ledger(spec.name), cand.relpath, json.dumps({"v": cand.version, "job": job, "at": 1.0}))


def test_legacy_ledger_entries_belong_to_the_first_evaluator_and_are_not_evaluated_again(
    conn: redis.Redis, settings: Settings, tmp_path: Path
) -> None:
    spec = add(conn, settings, suite_spec(tmp_path, names="loss"))
    write_checkpoints(spec, 2)
    cands = ready(spec, settings)
    for i, cand in enumerate(cands):
        legacy(conn, spec, cand, f"ev-old{i}")
    assert ledger.enqueue_new(conn, settings, spec, cands) == []  # after the upgrade: nothing evaluated again
    assert ledger.backfill(conn, settings, spec) == []
    assert conn.llen(queue_key("assayer-eval")) == 0
    assert slots(conn, spec, cands[0].relpath)["loss"].job == "ev-old0"

    watches.register(conn, settings, suite_spec(tmp_path))  # then a second evaluator: only it runs
    spec = watches.require(conn, "run")
    filled = ledger.backfill(conn, settings, spec)
    assert len(filled) == 2 and {j["evaluator_name"] for j in queued(conn, "assayer-eval-backfill")} == {"acc"}
    assert {n: s.job for n, s in slots(conn, spec, cands[1].relpath).items()}["loss"] == "ev-old1"


def test_a_legacy_entry_read_by_a_two_evaluator_watch_queues_only_the_second(
    conn: redis.Redis, settings: Settings, tmp_path: Path
) -> None:
    spec = add(conn, settings, suite_spec(tmp_path))
    write_checkpoints(spec, 1)
    (cand,) = ready(spec, settings)
    legacy(conn, spec, cand, "ev-old")
    (job,) = ledger.enqueue_new(conn, settings, spec, [cand])
    assert [j["evaluator_name"] for j in queued(conn, "assayer-eval")] == ["acc"]
    (entry,) = ledger.entries(conn, "run", [cand.relpath], spec.first)
    assert entry is not None and set(entry.jobs()) == {"ev-old", job}


def test_baseline_checkpoints_are_never_backfilled(conn: redis.Redis, settings: Settings, tmp_path: Path) -> None:
    one = suite_spec(tmp_path, names="loss", eval_existing=False)
    write_checkpoints(one, 2)
    spec = add(conn, settings, one)
    assert watches.baseline_size(conn, "run") == 2
    new = Path(spec.directory) / "step_900.pt"
    new.write_bytes(zip_bytes(9))
    assert len(ledger.enqueue_new(conn, settings, spec, ready(spec, settings))) == 1  # only the new one

    watches.register(conn, settings, suite_spec(tmp_path, eval_existing=False))
    spec = watches.require(conn, "run")
    filled = ledger.backfill(conn, settings, spec)
    assert [j["relpath"] for j in queued(conn, "assayer-eval-backfill")] == ["step_900.pt"] and len(filled) == 1
    assert ledger.enqueue_new(conn, settings, spec, ready(spec, settings)) == []
    assert watches.baseline_size(conn, "run") == 2  # still there, still not evaluated


def test_a_watch_worker_backfills_once_per_change_of_evaluators_unless_the_watch_opted_out(
    conn: redis.Redis, settings: Settings, tmp_path: Path
) -> None:
    spec = add(conn, settings, suite_spec(tmp_path, names="loss"))
    write_checkpoints(spec, 2)
    ledger.enqueue_new(conn, settings, spec, ready(spec, settings))
    assert jobs._backfill(jobs.Runtime(settings, conn), spec, ledger.versions(spec)) == []

    grown = suite_spec(tmp_path)
    grown.backfill = False  # --no-backfill
    watches.register(conn, settings, grown)
    spec = watches.require(conn, "run")
    assert jobs._backfill(jobs.Runtime(settings, conn), spec, ledger.versions(spec)) == []
    assert conn.llen(queue_key("assayer-eval-backfill")) == 0

    grown.backfill = True
    watches.register(conn, settings, grown)
    spec = watches.require(conn, "run")
    rt = jobs.Runtime(settings, conn)  # a watch worker seeing the watch for the first time
    assert len(jobs._backfill(rt, spec, ledger.versions(spec))) == 2
    assert jobs._backfill(rt, spec, ledger.versions(spec)) == []  # once per change
    edit(str(tmp_path / "evals" / "loss.py"))
    assert len(jobs._backfill(rt, spec, ledger.versions(spec))) == 2  # a new version of loss
    assert conn.llen(queue_key("assayer-eval-backfill")) == 4


# -- results ---------------------------------------------------------------------------------------


def result(watch: str, relpath: str, name: str, metrics: dict[str, Any], version: str = "ev1",
           status: str = "ok", step: int = 100, finished: float = 0.0) -> records.ResultRecord:
    """A final record of evaluator ``name`` on ``relpath``; ``finished`` orders records."""
    job = "ev-" + hashlib.sha1(f"{watch}{relpath}{name}{version}{finished}".encode()).hexdigest()[:16]
    payload = {"watch": watch, "checkpoint": f"/ckpts/{watch}/{relpath}", "relpath": relpath, "version": "v1",
               "step": step, "evaluator": f"/evals/{name}.py:{name}", "evaluator_name": name,
               "evaluator_version": version}
    rec = records.new_attempt(job, payload, 1, "eval-1", records.utcnow())
    done = records.finish(rec, status, True, None if status == "ok" else "ValueError: bad", metrics=metrics)
    done["finished_at"] = records.iso(1_700_000_000 + finished)
    return done


def test_metrics_are_named_evaluator_dot_metric_only_in_watches_with_several_evaluators() -> None:
    recs = [result("suite", "a.pt", "val", {"loss": 0.5}), result("suite", "a.pt", "mmlu", {"acc": 0.7}),
            result("single", "a.pt", "val", {"loss": 0.4})]
    shown = results.qualify(recs)
    assert [r["metrics"] for r in shown] == [{"val.loss": 0.5}, {"mmlu.acc": 0.7}, {"loss": 0.4}]
    assert recs[0]["metrics"] == {"loss": 0.5}  # the stored records are left as they are


def test_one_row_per_checkpoint_merges_each_evaluators_newest_result_and_keeps_older_versions_apart() -> None:
    recs = results.qualify([
        result("suite", "a.pt", "val", {"loss": 0.9}, version="ev1", finished=1),
        result("suite", "a.pt", "mmlu", {"acc": 0.7}, finished=2),
        result("suite", "a.pt", "val", {"loss": 0.5}, version="ev2", finished=3),
        result("suite", "b.pt", "val", {"loss": 0.4}, step=200, finished=4),
        result("suite", "b.pt", "mmlu", {}, status="failed", step=200, finished=5),
    ])
    rows = results.by_checkpoint(recs)
    merged = {(r["relpath"], r["status"]): r for r in rows}
    assert set(merged) == {("a.pt", "ok"), ("a.pt", "ok (old val ev1)"), ("b.pt", "failed")}
    assert merged[("a.pt", "ok")]["metrics"] == {"val.loss": 0.5, "mmlu.acc": 0.7}
    assert merged[("a.pt", "ok")]["evaluator"] == "mmlu,val" and len(merged[("a.pt", "ok")]["jobs"]) == 2
    assert merged[("a.pt", "ok (old val ev1)")]["metrics"] == {"val.loss": 0.9}
    assert merged[("b.pt", "failed")]["error"] == "mmlu: ValueError: bad"
    assert merged[("b.pt", "failed")]["metrics"] == {"val.loss": 0.4}
    table = results.to_table(rows)
    assert "mmlu.acc" in table and "val.loss" in table and "ok (old val ev1)" in table


def test_best_compares_one_evaluators_metric_by_its_qualified_name() -> None:
    recs = results.qualify([
        result("suite", "a.pt", "val", {"loss": 0.5}, step=100), result("suite", "a.pt", "mmlu", {"acc": 0.6}),
        result("suite", "b.pt", "val", {"loss": 0.3}, step=200), result("suite", "b.pt", "mmlu", {"acc": 0.4}),
    ])
    chosen, rule = results.best(recs, "val.loss")
    assert chosen["suite"]["relpath"] == "b.pt" and rule.mode == "min"
    chosen, rule = results.best(recs, "mmlu.acc")
    assert chosen["suite"]["relpath"] == "a.pt" and rule.mode == "max"
    with pytest.raises(ValueError, match=r"metrics present: mmlu\.acc, val\.loss"):
        results.best(recs, "loss")


def test_results_best_on_the_command_line_names_the_evaluator_and_marks_the_merged_row(
    conn: redis.Redis, settings: Settings, tmp_path: Path
) -> None:
    add(conn, settings, suite_spec(tmp_path, names="loss,acc"))
    for rec in (result("run", "a.pt", "loss", {"loss": 0.5}, step=100), result("run", "a.pt", "acc", {"acc": 0.6}),
                result("run", "b.pt", "loss", {"loss": 0.2}, step=200),
                result("run", "b.pt", "acc", {"acc": 0.5}, step=200)):
        assert results.record(conn, settings.results_path, rec)
    out = invoke(settings, "results", "--best", "loss.loss")
    assert out.returncode == 0, out.stderr
    assert "best loss.loss for run: 0.2 at /ckpts/run/b.pt (lower is better (name: 'loss'))" in out.stdout
    rows = [line for line in out.stdout.splitlines() if line.startswith("*")]
    assert len(rows) == 1 and "b.pt" in rows[0]  # one row per checkpoint, both evaluators' metrics in it
    header = out.stdout.splitlines()[0].split()
    assert {"acc.acc", "loss.loss"} <= set(header)
    best_json = json.loads(invoke(settings, "results", "--best", "acc.acc:max", "--format", "json").stdout)
    assert [r["checkpoint"] for r in best_json] == ["/ckpts/run/a.pt"]
    bad = invoke(settings, "results", "--best", "loss")
    assert bad.returncode == 2 and "metrics present: acc.acc, loss.loss" in bad.stderr


def test_spec_round_trips_its_suite_and_reads_specs_from_before_suites(tmp_path: Path) -> None:
    spec = suite_spec(tmp_path, pools=("acc=gpu",))
    spec.order, spec.every, spec.backfill = "oldest", 50, False
    again = WatchSpec.from_json(spec.to_json())
    assert again == spec and again.evaluators[1] == Evaluator("acc", spec.evaluators[1].ref, "gpu")
    old = json.loads(spec.to_json())
    for field in ("evaluators", "backfill", "order", "every"):
        old.pop(field)
    legacy_spec = WatchSpec.from_json(json.dumps(old))
    assert legacy_spec.evaluators == [Evaluator("loss", spec.evaluator, "default")]
    assert (legacy_spec.backfill, legacy_spec.order, legacy_spec.every, legacy_spec.first) == (True, "newest", None,
                                                                                             "loss")


def test_an_unknown_evaluator_name_is_refused_with_the_names_there_are(tmp_path: Path) -> None:
    spec = suite_spec(tmp_path)
    assert spec.evaluator_named("acc").name == "acc"
    with pytest.raises(WatchError, match="has no evaluator 'mmlu'") as caught:
        spec.evaluator_named("mmlu")
    assert caught.value.hint == "its evaluators: loss, acc"

