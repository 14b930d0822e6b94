"""The ``assayer`` command. Logging is configured here and nowhere else."""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
import redis

from . import __version__, defaults, keys, ledger, results, status, watches
from .errors import AssayerError, ConfigError, RedisUnavailable, WatchError
from .layouts import LAYOUTS
from .records import ResultRecord
from .settings import Settings, connect

log = logging.getLogger("assayer.cli")


LONG_RUNNING = frozenset({"worker", "dashboard", "exporter", "up"})
"""Commands that run on (they log at ASSAYER_LOG_LEVEL, INFO by default); the others log warnings only."""


def setup_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)


class Context:
    def __init__(self, **flags: Any) -> None:
        self.flags = flags
        self._settings: Settings | None = None
        self._conn: Any = None

    @property
    def settings(self) -> Settings:
        if self._settings is None:
            self._settings = Settings.from_env(**self.flags)
        return self._settings

    @property
    def conn(self) -> Any:
        if self._conn is None:
            self._conn = connect(self.settings)
        return self._conn


pass_ctx = click.make_pass_decorator(Context)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="assayer")
@click.option("--redis-url", help="Redis URL [env ASSAYER_REDIS_URL; default: the local stack, else redis://localhost:6379/0]")
@click.option("--log-level", default=None, help="DEBUG, INFO, WARNING [env ASSAYER_LOG_LEVEL]")
@click.pass_context
def cli(ctx: click.Context, redis_url: str | None, log_level: str | None) -> None:
    """Evaluate every checkpoint of a training run on Redis Queue workers."""
    ctx.obj = Context(redis_url=redis_url, log_level=log_level)
    if ctx.invoked_subcommand in LONG_RUNNING:
        setup_logging(log_level or os.environ.get("ASSAYER_LOG_LEVEL") or "INFO")
    else:  # a command's output is its answer: only warnings and errors go to stderr beside it
        setup_logging(log_level or "WARNING")


# -- workers ---------------------------------------------------------------------------------


@cli.command()
@click.argument("role", type=click.Choice(["watch", "eval"]))
@click.option("--name", help="Worker name (default: ROLE-HOST-PID-RANDOM)")
@click.option("--burst", is_flag=True, help="Stop when the queue is empty (tests, batch use)")
@click.option("--watches-file", type=click.Path(dir_okay=False, path_type=Path), help="[env ASSAYER_WATCHES_FILE]")
@click.option("--pool", "pool_names", metavar="POOL[,POOL...]",
              help="eval: the pools whose evaluations this worker runs [env ASSAYER_POOLS; default: default]")
@pass_ctx
def worker(ctx: Context, role: str, name: str | None, burst: bool, watches_file: Path | None,
           pool_names: str | None) -> None:
    """Run a watch or eval worker until shutdown. Reconnects when Redis goes away."""
    from . import pools
    from .workers import WORKERS

    settings = ctx.settings.replace(watches_file=watches_file, pools=pools.parse(pool_names) if pool_names else None)
    if role == "watch":  # its reporter thread: MLflow's client would otherwise retry a dead server for minutes
        for var, value in defaults.TRACKER_ENV.items():
            os.environ.setdefault(var, value)
    delay = 1.0
    while True:
        try:
            conn = connect(settings)
            w = WORKERS[role](settings, conn, name=name)
            # rq logs every job at INFO; scans run twice a second, so only an explicit DEBUG shows them
            rq_level = settings.log_level if role == "eval" or settings.log_level.upper() == "DEBUG" else "WARNING"
            w.work(burst=burst, logging_level=rq_level, with_scheduler=False)
            if burst or w.stop_requested:
                return
            # rq leaves its loop on some errors (a Redis timeout, say): exit 0 would read as a clean stop
            log.error("the %s worker loop ended unexpectedly; starting again in %.0fs", role, delay)
        except (RedisUnavailable, redis.ConnectionError, redis.TimeoutError) as exc:
            if burst:
                raise
            log.error("%s; retrying in %.0fs", exc, delay)
        time.sleep(delay)
        delay = min(delay * 2, 30.0)


@cli.command()
@click.argument("role", type=click.Choice(["watch", "eval"]))
@pass_ctx
def health(ctx: Context, role: str) -> None:
    """Exit 0 when a ROLE worker on this host reported in the last minute (for probes)."""
    host = socket.gethostname()
    name = ctx.conn.get(keys.host_health(role, host))
    if not name:
        click.echo(f"no live {role} worker on {host}", err=True)
        sys.exit(1)
    click.echo(f"live {role} worker on {host}: {name.decode()}")


# -- watches ---------------------------------------------------------------------------------


@cli.group()
def watch() -> None:
    """Add, list, pause, resume and remove watches."""


@watch.command("add")
@click.argument("directory")
@click.option("--evaluator", "-e", "evaluator_refs", required=True, multiple=True, metavar="[NAME=]REF",
              help="path/to/file.py:fn or package.module.fn, named NAME (default: the function's name); repeatable: "
                   "each checkpoint gets one evaluation per evaluator")
@click.option("--pool", "pool_items", multiple=True, metavar="[NAME=]POOL",
              help="Run evaluator NAME (or every one) only on eval workers of POOL, e.g. --pool mmlu=gpu [default: default]")
@click.option("--no-backfill", is_flag=True,
              help="When an evaluator is added or its version changes, do not evaluate the checkpoints already evaluated")
@click.option("--order", type=click.Choice(["newest", "oldest"]), default="newest", show_default=True,
              help="Which checkpoints are evaluated first")
@click.option("--every", type=click.IntRange(min=1), metavar="N",
              help="Evaluate only checkpoints whose step is a multiple of N (and always the newest)")
@click.option("--snapshot", type=click.Choice(["off", "link", "copy", "auto"]),
              help="Pin each checkpoint (hard links, or a copy) before queueing it, so the trainer's rotation "
                   "cannot delete it first [default: ASSAYER_SNAPSHOT, else off]")
@click.option("--snapshot-dir", help="Where the snapshots go (a writable volume) [default: ASSAYER_SNAPSHOT_DIR]")
@click.option("--when-full", type=click.Choice(["wait", "skip"]), default="wait", show_default=True,
              help="The copy cache is full (ASSAYER_SNAPSHOT_MAX_GB): new checkpoints wait, or are recorded skipped")
@click.option("--name", help="Watch name (default: the directory's name)")
@click.option("--regex", help="Filter searched in each file's absolute path [default: common checkpoint extensions]")
@click.option("--eval-existing", is_flag=True, help="Also evaluate checkpoints already there")
@click.option("--poll-interval", type=float, help="Seconds between scans [default: ASSAYER_POLL_INTERVAL]")
@click.option("--settle", type=float,
              help="Seconds a file of unknown format must stay unchanged [default: ASSAYER_SETTLE]. On NFS, "
                   "set it above the mount's attribute cache time (actimeo).")
@click.option("--layout", default="auto", show_default=True, metavar="|".join(LAYOUTS),
              help="How directory checkpoints are recognised: auto detects Hugging Face, torch DCP, DeepSpeed, "
                   "Megatron, Orbax and marker directories; file treats only files as checkpoints")
@click.option("--ready-marker", "ready_markers", multiple=True, metavar="NAME",
              help="A file your trainer writes last into each checkpoint directory (repeatable); "
                   "step-named directories then wait for it")
@click.option("--follow-symlinks", is_flag=True, help="Also follow links that lead out of DIRECTORY")
@click.option("--report-to", metavar="tensorboard,mlflow,wandb",
              help="Trackers each result is logged to at its step [default: ASSAYER_REPORT_TO, else none]")
@click.option("--tensorboard-dir", help="TensorBoard log directory [default: $ASSAYER_RESULTS_DIR/tensorboard/NAME]")
@click.option("--mlflow-run-id", help="Log into this MLflow run (the training run) [default: a run named after the watch]")
@click.option("--wandb-run-id", help="Log into this W&B run (the training run) [default: a run named after the watch]")
@pass_ctx
def watch_add(ctx: Context, directory: str, evaluator_refs: tuple[str, ...], pool_items: tuple[str, ...],
              no_backfill: bool, order: str, every: int | None, snapshot: str | None, snapshot_dir: str | None,
              when_full: str, name: str | None, regex: str | None,
              eval_existing: bool, poll_interval: float | None, settle: float | None, layout: str,
              ready_markers: tuple[str, ...], follow_symlinks: bool, report_to: str | None,
              tensorboard_dir: str | None, mlflow_run_id: str | None, wandb_run_id: str | None) -> None:
    """Watch DIRECTORY (recursively) and evaluate each new complete checkpoint: a file or a directory."""
    ctx.conn  # noqa: B018 -- Redis first: importing an evaluator (torch, say) can take seconds before that error
    report = watches.Report(ctx.settings.report_to if report_to is None else report_to,
                            os.path.abspath(tensorboard_dir) if tensorboard_dir else None, mlflow_run_id, wandb_run_id)
    spec, warnings = watches.build_spec(directory, list(evaluator_refs), name, regex, eval_existing, poll_interval,
                                        settle, layout=layout, ready_markers=ready_markers,
                                        evaluator_paths=ctx.settings.evaluator_paths, follow_symlinks=follow_symlinks,
                                        report=report, suite=watches.Suite(pool_items, not no_backfill, order, every),
                                        snapshot=watches.Snapshot(snapshot or ctx.settings.snapshot, snapshot_dir,
                                                                  when_full))
    per_pool = {p: sum(1 for e in spec.evaluators if e.pool == p) for p in {e.pool for e in spec.evaluators}}
    crowded = sorted(p for p, n in per_pool.items() if n > ctx.settings.max_warm_evaluators)
    if crowded:
        warnings.append(f"pool {', '.join(crowded)} has more evaluators than an eval worker keeps warm "
                        f"(ASSAYER_MAX_WARM={ctx.settings.max_warm_evaluators}): set ASSAYER_MAX_WARM on the eval "
                        f"workers to {max(per_pool.values())} or more, or each evaluation may start its evaluator anew")
    for warning in warnings:
        click.echo(f"warning: {warning}", err=True)
    outcome = watches.register(ctx.conn, ctx.settings, spec)
    click.echo(f"watch {spec.name} {outcome}: {spec.directory} -> {spec.shown_evaluators()}"
               + (f" (results also to {', '.join(spec.report_to)})" if spec.report_to else ""))
    existing = watches.baseline_size(ctx.conn, spec.name) if outcome == "added" else 0
    if existing:
        click.echo(f"{existing} existing checkpoint(s) are not evaluated; use --eval-existing or "
                   f"`assayer evaluate --watch {spec.name}`")


@watch.command("list")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table")
@pass_ctx
def watch_list(ctx: Context, fmt: str) -> None:
    """List watches."""
    specs = watches.all_specs(ctx.conn)
    if fmt == "json":
        click.echo(json.dumps([json.loads(s.to_json()) for s in specs], indent=2))
        return
    for s in specs:
        click.echo(f"{s.name}{' (paused)' if s.paused else ''}\t{s.directory}\t{s.shown_evaluators()}\t{s.regex}\t{s.layout}")
    if not specs:
        click.echo("no watches")


def _name_command(verb: str, action: Callable[[Any, str], Any], help_text: str) -> None:
    @watch.command(verb, help=help_text)
    @click.argument("name")
    @pass_ctx
    def command(ctx: Context, name: str) -> None:
        action(ctx.conn, name)
        click.echo(f"watch {name}: {verb}d" if verb.endswith("e") else f"watch {name}: {verb}ed")


_name_command("remove", watches.remove, "Stop watching NAME and forget its ledger (results stay).")
_name_command("pause", lambda c, n: watches.set_paused(c, n, True), "Stop scanning NAME until resumed.")
_name_command("resume", lambda c, n: watches.set_paused(c, n, False), "Scan NAME again.")


@cli.command()
@click.argument("paths", nargs=-1)
@click.option("--watch", "watch_name", required=True, help="Watch whose evaluators to use")
@click.option("--evaluator", "evaluator_names", multiple=True, metavar="NAME",
              help="Only this evaluator of the watch (repeatable) [default: all of them]")
@click.option("--force", is_flag=True, help="Evaluate again even checkpoints that already have a result")
@pass_ctx
def evaluate(ctx: Context, paths: tuple[str, ...], watch_name: str, evaluator_names: tuple[str, ...],
             force: bool) -> None:
    """Evaluate existing checkpoints of a watch now: PATHS, or every complete one lacking an evaluation.

    Without PATHS this is a backfill: each checkpoint gets exactly the evaluations it lacks at the
    evaluators' current versions, queued after new checkpoints.
    """
    spec = watches.require(ctx.conn, watch_name)
    only = [spec.evaluator_named(n).name for n in evaluator_names] or [e.name for e in spec.evaluators]
    current = ledger.versions(spec)
    report = spec.scanner(ctx.settings).scan(time.time())
    ready = {c.path: c for c in report.ready}
    if paths:  # named on request: evaluated (again), whatever the ledger says, before backfill work
        wanted = [os.path.abspath(p) for p in paths]
        unknown = [p for p in wanted if p not in ready]
        if unknown:
            raise WatchError(f"not a complete checkpoint of watch {spec.name}: {', '.join(unknown)}",
                             f"give files under {spec.directory} that match {spec.regex} and are fully written")
        ids = ledger.enqueue_new(ctx.conn, ctx.settings, spec, [ready[p] for p in wanted], force=True,
                                 current=current, only=only)
    elif force:
        ids = ledger.enqueue_new(ctx.conn, ctx.settings, spec, list(ready.values()), force=True, current=current,
                                 only=only, backfill=True)
    else:  # what the ledger lacks (the ledger dedupes against a concurrent scan), then what was lost
        ids = ledger.enqueue_new(ctx.conn, ctx.settings, spec, list(ready.values()), current=current, only=only,
                                 backfill=True)
        lost: dict[tuple[str, ...], list[Any]] = {}
        for cand, names in ledger.unevaluated(ctx.conn, spec, list(ready.values()), current, only):
            lost.setdefault(tuple(names), []).append(cand)
        for which, cands in lost.items():  # in one call per evaluator set: queued in the watch's --order
            ids += ledger.enqueue_new(ctx.conn, ctx.settings, spec, cands, force=True, current=current,
                                      only=list(which), backfill=True)
    click.echo(f"queued {len(ids)} evaluation(s) for watch {spec.name}")


@cli.command()
@click.option("--watch", "watch_name", required=True, help="Watch whose results to deliver")
@click.option("--to", "to", metavar="tensorboard,mlflow,wandb", help="Trackers [default: the watch's --report-to]")
@pass_ctx
def report(ctx: Context, watch_name: str, to: str | None) -> None:
    """Deliver a watch's past results to trackers (after adding one, or an outage); delivered ones are skipped.

    The watch workers deliver them, each once, at its checkpoint's step; `assayer status` shows progress.
    """
    from . import deliveries
    from .sinks import parse_report_to

    spec = watches.require(ctx.conn, watch_name)
    sinks = parse_report_to(to) if to else spec.report_to
    if not sinks:
        raise ConfigError(f"watch {spec.name} reports to no tracker", "give --to tensorboard,mlflow,wandb")
    count = deliveries.schedule(ctx.conn, spec.name, sinks, results.load(ctx.conn, [spec.name], retrying=False))
    click.echo(f"queued {count} delivery(ies) of watch {spec.name} to {', '.join(sinks)}; already delivered ones skipped")


# -- results and status ------------------------------------------------------------------------


@cli.command("results")
@click.argument("watch_name", required=False)
@click.option("--format", "fmt", type=click.Choice(["table", "json", "csv"]), default="table")
@click.option("--best", help="[EVALUATOR.]METRIC[:max|min]: mark (table) or keep only (json/csv) the best checkpoint "
                             "per watch (EVALUATOR. where a watch has several evaluators)")
@click.option("--plot", type=click.Path(dir_okay=False, path_type=Path), help="Write a PNG of metrics by step")
@click.option("--metric", help="Metric to plot [default: the --best metric, else the first one]")
@click.option("--source", type=click.Choice(["redis", "files"]), default="redis",
              help="files: read the JSON-lines copies in ASSAYER_RESULTS_DIR (when Redis was lost)")
@click.option("--export", is_flag=True, help="Rebuild the JSON-lines files in ASSAYER_RESULTS_DIR from Redis")
@click.option("--failed", is_flag=True, help="Only failed evaluations (final or waiting to retry), with full tracebacks")
@pass_ctx
def results_command(ctx: Context, watch_name: str | None, fmt: str, best: str | None, plot: Path | None,
                    metric: str | None, source: str, export: bool, failed: bool) -> None:
    """Show evaluation results (and evaluations failing now, waiting to retry)."""
    if export:
        names = [watches.require(ctx.conn, watch_name).name] if watch_name else [s.name for s in watches.all_specs(ctx.conn)]
        for name in names:
            count = results.export(ctx.conn, ctx.settings.results_path, name)
            click.echo(f"{ctx.settings.results_path / (name + '.jsonl')}: {count} result line(s) from Redis")
        return
    if source == "files":
        records = results.load_files(ctx.settings.results_path, watch_name)
    else:
        names = [watch_name] if watch_name else [s.name for s in watches.all_specs(ctx.conn)]
        if watch_name and not ctx.conn.exists(keys.results(watch_name)):
            watches.require(ctx.conn, watch_name)
        records = results.load(ctx.conn, names)
    specs = {s.name: [e.name for e in s.evaluators] for s in watches.all_specs(ctx.conn)} if source == "redis" else {}
    records = results.qualify(records, specs)  # EVALUATOR.METRIC where a watch has several evaluators
    if failed:
        shown = [r for r in records if r.get("status") != "ok" and r.get("error")]
        click.echo(results.to_json(shown) if fmt == "json" else results.tracebacks(shown) or "no failed evaluations")
        return
    best_pair = _parse_best(best)
    winners: dict[str, ResultRecord] = {}
    rule = None
    if best_pair:
        try:
            winners, rule = results.best(records, *best_pair)
        except ValueError as exc:
            raise ConfigError(str(exc), "pick a metric your evaluator returns") from None
    if plot:
        from .plot import plot_results

        try:
            out = plot_results(records, plot, metric or (best_pair[0] if best_pair else None), best_pair)
        except ValueError as exc:
            raise ConfigError(str(exc), "pick a metric your evaluator returns") from None
        click.echo(f"plot written to {out}", err=True)
    if fmt == "table":
        click.echo(results.to_table(results.by_checkpoint(records), {r["job_id"] for r in winners.values()}))
        for w, r in winners.items():
            click.echo(f"best {best_pair[0]} for {w}: {r['metrics'][best_pair[0]]} at {r['checkpoint']}"  # type: ignore[index]
                       f" ({rule})")
        return
    shown = list(winners.values()) if best_pair else records
    click.echo(results.to_json(shown) if fmt == "json" else results.to_csv(shown), nl=fmt == "json")


@cli.command()
@click.argument("checkpoint")
@click.option("--watch", "watch_name", help="The watch it belongs to [default: every watch whose directory holds it]")
@pass_ctx
def show(ctx: Context, checkpoint: str, watch_name: str | None) -> None:
    """Every attempt at evaluating CHECKPOINT (a path, or a path relative to the watch), with full tracebacks."""
    specs = [watches.require(ctx.conn, watch_name)] if watch_name else watches.all_specs(ctx.conn)
    found = []
    for spec in specs:
        path = os.path.abspath(checkpoint)
        rel = os.path.relpath(path, spec.directory) if path.startswith(spec.directory.rstrip("/") + "/") else checkpoint
        found += results.for_checkpoint(ctx.conn, spec.name, rel.rstrip("/"))
    if not found:
        raise WatchError(f"no evaluation of {checkpoint} is recorded",
                         "give its path (or its path relative to the watch directory) as `assayer results` shows it")
    click.echo(results.tracebacks(found))


def _parse_best(best: str | None) -> tuple[str, str | None] | None:
    """``METRIC[:max|min]``; without a mode, :func:`assayer.directions.direction` decides (and says why)."""
    if not best:
        return None
    metric, _, mode = best.partition(":")
    if not mode:
        return metric, None
    if mode not in ("max", "min"):
        raise ConfigError(f"--best {best}: mode must be max or min", "e.g. --best accuracy:max or --best loss:min")
    return metric, mode


@cli.command("status")
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text")
@click.option("--interval", type=float, help="Refresh every INTERVAL seconds in place (as `rq info --interval`)")
@pass_ctx
def status_command(ctx: Context, fmt: str, interval: float | None) -> None:
    """Watches and their lag, failures, queue depths, workers and what they evaluate."""
    while True:
        info = status.collect(ctx.conn, ctx.settings)
        text = json.dumps(info, indent=2) if fmt == "json" else status.render(info)
        if not interval:
            click.echo(text)
            return
        click.echo("\x1b[H\x1b[2J" + text if sys.stdout.isatty() else text + "\n")  # home, clear: in place
        time.sleep(interval)


@cli.command()
@pass_ctx
def restore(ctx: Context) -> None:
    """Rebuild watches, ledgers and results from ASSAYER_RESULTS_DIR after Redis lost its data.

    Then queue exactly the checkpoint versions that were queued but never got a final result.
    """
    from . import backup

    results_dir = ctx.settings.results_path
    summary = backup.restore(ctx.conn, results_dir)
    if not summary:
        raise ConfigError(f"{results_dir} holds no mirrored watch ({backup.SPEC_SUFFIX} files)",
                          "point ASSAYER_RESULTS_DIR (or ASSAYER_HOME) at the results directory the workers used")
    for name, counts in summary.items():
        spec = watches.require(ctx.conn, name)
        todo = backup.unfinished(ctx.conn, name, spec.first)
        by_evaluators: dict[tuple[str, ...], list[Any]] = {}
        for cand in spec.scanner(ctx.settings).scan(time.time()).ready:
            version, names = todo.get(cand.relpath, ("", []))
            if version == cand.version:
                by_evaluators.setdefault(tuple(names), []).append(cand)
        ids = []
        for which, cands in by_evaluators.items():  # only the evaluators that never finished, each once
            ids += ledger.enqueue_new(ctx.conn, ctx.settings, spec, cands, force=True, only=list(which))
        click.echo(f"watch {name}: {counts['ledger']} ledger entries and {counts['results']} results restored; "
                   f"{len(ids)} unfinished evaluation(s) queued again")


@cli.command()
@click.option("--purge", is_flag=True, help="Also empty the queues (queued evaluations are dropped)")
@pass_ctx
def shutdown(ctx: Context, purge: bool) -> None:
    """Stop every worker after its current job. Queued evaluations stay queued unless --purge."""
    from .workers import request_shutdown

    stopped = request_shutdown(ctx.conn, ctx.settings, purge)
    click.echo(f"shutdown requested for {stopped} worker(s)" + ("; queues emptied" if purge else
                                                               "; queued evaluations resume on restart"))


@cli.command()
@pass_ctx
def dashboard(ctx: Context) -> None:
    """Run rq-dashboard on waitress (JSON serializer, basic auth, actions off unless allowed, CSRF-checked)."""
    from .dashboard import run

    run(ctx.settings)


@cli.command()
@pass_ctx
def exporter(ctx: Context) -> None:
    """Serve Prometheus metrics read from Redis at /metrics (no password: bind it where only Prometheus reaches).

    Listens on ASSAYER_EXPORTER_BIND:ASSAYER_EXPORTER_PORT (127.0.0.1:9182 by default).
    """
    import waitress

    from .exporter import wsgi_app
    from .ports import require_free

    settings = ctx.settings
    require_free(settings.exporter_port, settings.exporter_bind, "the exporter",
                 "stop that process, or set ASSAYER_EXPORTER_PORT to a free port")
    log.info("Prometheus metrics on http://%s:%d/metrics", settings.exporter_bind, settings.exporter_port)
    waitress.serve(wsgi_app(ctx.conn, settings), host=settings.exporter_bind, port=settings.exporter_port, threads=2,
                   ident="waitress")


def _register_stack_commands() -> None:
    from .stack import down, up

    cli.add_command(up)
    cli.add_command(down)


_register_stack_commands()


def main(argv: list[str] | None = None) -> None:
    try:
        cli.main(args=argv, prog_name="assayer", standalone_mode=False)
    except click.exceptions.Abort:
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except AssayerError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        click.echo(f"error: lost the connection to Redis: {exc}\n  fix: check that Redis is up (assayer status)",
                   err=True)
        sys.exit(RedisUnavailable.exit_code)
