"""Assayer's pages beside rq-dashboard: watches, a watch's checkpoints, their JSON API, and ``/metrics``.

A Flask blueprint mounted in the dashboard's app, so the same basic auth and action rule apply
(:mod:`assayer.dashboard`): the POST routes here (re-evaluate, pause, resume) are actions, refused
unless ``ASSAYER_DASHBOARD_ALLOW_ACTIONS`` is true and then only with the CSRF token. Pages are
plain HTML with server-drawn SVG curves: nothing is loaded from a CDN. A page refreshes itself
every few seconds while its watch has work in flight.

JSON API (same data as the pages):

* ``GET /api/watches``: every watch with its lag, oldest unevaluated age, counts by status, last
  scan, last error and tracker deliveries.
* ``GET /api/watches/<name>/checkpoints?page=N&per_page=M``: its checkpoints by step with status,
  metrics, attempts, duration, worker, error and traceback; the best checkpoint per metric.
"""

from __future__ import annotations

import math
import time
from typing import Any

from flask import Blueprint, Response, abort, current_app, jsonify, redirect, request
from markupsafe import escape

from . import checkpoints, defaults, ledger, status, watches

blueprint = Blueprint("assayer", __name__)

REFRESH = 5
"""Seconds between two reloads of a page whose watch has work in flight."""

STYLE = """<style>
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222}table{border-collapse:collapse;margin:.5em 0}
td,th{border-bottom:1px solid #ddd;padding:3px 8px;text-align:left;vertical-align:top}th{background:#f4f4f4}
.ok{color:#176c2c}.failed,.missing,.unfinished{color:#b00020}.retrying{color:#b35900}.best{background:#fff5c2;font-weight:600}
nav a{margin-right:1em}pre{white-space:pre-wrap;max-width:70em;font-size:12px;background:#f8f8f8;padding:4px}
svg{border:1px solid #ddd;margin:0 1em 1em 0;background:#fff}.muted{color:#777}
</style>"""


def _conn() -> Any:
    return current_app.config["ASSAYER_CONN"]


def _settings() -> Any:
    return current_app.config["ASSAYER_SETTINGS"]


def _spec(name: str) -> watches.WatchSpec:
    spec = watches.get(_conn(), name) if watches.NAME_RE.fullmatch(name) else None
    if spec is None:
        abort(404, description=f"no watch named {name!r}")
    return spec


def watch_list() -> list[dict[str, Any]]:
    return list(status.collect(_conn(), _settings())["watches"])


def watch_view(name: str, number: int = 1, size: int = defaults.PAGE_SIZE) -> dict[str, Any]:
    spec = _spec(name)
    rows = checkpoints.rows(_conn(), spec.name, checkpoints.running_jobs(_conn(), _settings()))
    shown, pages = checkpoints.page(rows, number, size)
    return {"watch": spec.name, "directory": spec.directory, "evaluator": spec.shown_evaluators(),
            "several": len(spec.evaluators) > 1, "paused": spec.paused,
            "counts": checkpoints.counts(rows), "metrics": checkpoints.metric_names(rows),
            "best": checkpoints.best(rows), "page": min(max(number, 1), pages), "pages": pages,
            "per_page": size, "total": len(rows), "checkpoints": shown, "_all": rows}


# -- JSON -------------------------------------------------------------------------------------


@blueprint.get("/api/watches")
def api_watches() -> Response:
    return jsonify({"watches": watch_list()})


@blueprint.get("/api/watches/<name>/checkpoints")
def api_checkpoints(name: str) -> Response:
    view = watch_view(name, _int_arg("page", 1), min(_int_arg("per_page", defaults.PAGE_SIZE), 1000))
    view.pop("_all")
    return jsonify(view)


def _int_arg(name: str, default: int) -> int:
    try:
        return max(1, int(request.args.get(name, default)))
    except ValueError:
        abort(400, description=f"{name} must be a whole number")


# -- actions (POST, CSRF-checked by the dashboard's guard) --------------------------------------


@blueprint.post("/api/watches/<name>/pause")
def pause(name: str) -> Response:
    watches.set_paused(_conn(), _spec(name).name, True)
    return _back(name)


@blueprint.post("/api/watches/<name>/resume")
def resume(name: str) -> Response:
    watches.set_paused(_conn(), _spec(name).name, False)
    return _back(name)


@blueprint.post("/api/watches/<name>/evaluate")
def evaluate(name: str) -> Response:
    """Re-evaluate one checkpoint (form field ``relpath``), as ``assayer evaluate --force PATH`` does."""
    spec = _spec(name)
    relpath = request.form.get("relpath", "")
    ready = {c.relpath: c for c in spec.scanner(_settings()).scan(time.time()).ready}
    if relpath not in ready:
        abort(400, description=f"{relpath!r} is not a complete checkpoint of watch {spec.name}")
    ledger.enqueue_new(_conn(), _settings(), spec, [ready[relpath]], force=True)
    return _back(name)


def _back(name: str) -> Response:
    if request.accept_mimetypes.best == "application/json":
        return jsonify({"ok": True})
    return redirect(f"/checkpoints/{name}", 303)  # type: ignore[return-value]


# -- pages ------------------------------------------------------------------------------------


def _page(title: str, body: str, refresh: bool) -> Response:
    head = f'<meta http-equiv="refresh" content="{REFRESH}">' if refresh else ""
    nav = '<nav><a href="/checkpoints/">Watches</a><a href="/">rq-dashboard: queues, jobs, workers</a></nav>'
    html = (f"<!doctype html><html><head><meta charset=utf-8><title>{escape(title)}</title>{head}{STYLE}</head>"
            f"<body>{nav}<h1>{escape(title)}</h1>{body}</body></html>")
    return Response(html, mimetype="text/html")


@blueprint.get("/checkpoints/")
def watches_page() -> Response:
    items = watch_list()
    head = ("<tr><th>watch</th><th>directory</th><th>evaluator</th><th>lag</th><th>oldest unevaluated</th>"
            "<th>ok</th><th>failed</th><th>missing</th><th>being written</th><th>last scan</th><th>last error</th></tr>")
    body = []
    for w in items:
        oldest = f"{w['oldest_pending_age']:.0f} s" if w["oldest_pending_age"] is not None else ""
        scan = f"{w['last_scan_ago']:.0f} s ago" if w["last_scan_ago"] is not None else "never"
        error = w["last_error"] or w["error"] or ""
        body.append(
            f"<tr><td><a href='/checkpoints/{escape(w['name'])}'>{escape(w['name'])}</a>"
            f"{' (paused)' if w['paused'] else ''}</td><td>{escape(w['directory'])}</td><td>{escape(w['evaluator'])}</td>"
            f"<td>{w['queued_or_running']}</td><td>{oldest}</td><td class=ok>{w['outcomes']['ok']}</td>"
            f"<td class=failed>{w['outcomes']['failed']}</td><td class=missing>{w['outcomes']['missing']}</td>"
            f"<td>{w['incomplete']}</td><td>{scan}</td><td class=failed>{escape(error)}</td></tr>")
    table = f"<table>{head}{''.join(body)}</table>" if items else "<p>No watches yet: <code>assayer watch add</code>.</p>"
    busy = any(w["queued_or_running"] or w["incomplete"] for w in items)
    return _page("Watches", table, busy)


@blueprint.get("/checkpoints/<name>")
def watch_page(name: str) -> Response:
    view = watch_view(name, _int_arg("page", 1))
    best_jobs = {b["job_id"]: m for m, b in view["best"].items()}
    actions = bool(_settings().dashboard_allow_actions)
    metrics = view["metrics"]
    several = view["several"]  # one row per checkpoint and evaluator
    head = ("<tr><th>step</th><th>checkpoint</th>" + ("<th>evaluator</th>" if several else "") + "<th>status</th>"
            + "".join(f"<th>{escape(m)}</th>" for m in metrics)
            + "<th>attempt</th><th>secs</th><th>worker</th><th>error</th>" + ("<th></th>" if actions else "") + "</tr>")
    body = []
    for r in view["checkpoints"]:
        best_of = {m for m, b in view["best"].items() if b["job_id"] and b["job_id"] == r["job_id"]}
        cells = "".join(
            f"<td class='{'best' if m in best_of else ''}'>{_fmt(r['metrics'].get(m))}</td>" for m in metrics)
        error = ""
        if r["error"]:
            error = f"<details><summary>{escape(r['error'].splitlines()[0][:120])}</summary>"
            error += f"<pre>{escape(r['error'])}\n{escape(r['traceback'] or '')}</pre></details>"
        button = ""
        if actions and r["status"] not in ("writing",):
            button = (f"<td><form method=post action='/api/watches/{escape(view['watch'])}/evaluate' class=act>"
                      f"<input type=hidden name=relpath value='{escape(r['relpath'])}'>"
                      "<input type=hidden name=csrf_token><button>re-evaluate</button></form></td>")
        older = " <span class=muted>(older version)</span>" if r.get("older_version") else ""
        body.append(
            f"<tr class='{'best' if r['job_id'] in best_jobs else ''}'><td>{'' if r['step'] is None else r['step']}</td>"
            f"<td>{escape(r['relpath'])}{older}</td>"
            + (f"<td>{escape(r['evaluator'] or '')} <span class=muted>{escape(r['evaluator_version'] or '')}</span></td>"
               if several else "")
            + f"<td class='{r['status']}'>{r['status']}</td>{cells}"
            f"<td>{r['attempt'] or ''}</td><td>{_fmt(r['duration'])}</td><td>{escape(r['worker'] or '')}</td>"
            f"<td>{error}</td>{button}</tr>")
    counts = ", ".join(f"{n} {s}" for s, n in view["counts"].items() if n)
    best = "".join(f"<li>{escape(m)} ({b['mode']}, {escape(b['why'])}): <b>{_fmt(b['value'])}</b> at step "
                   f"{b['step']} &mdash; {escape(b['relpath'])}</li>" for m, b in view["best"].items())
    curves = "".join(curve_svg(m, view["_all"], view["best"].get(m)) for m in metrics)
    pager = _pager(view)
    toggle = ""
    if actions:
        verb = "resume" if view["paused"] else "pause"
        toggle = (f"<form method=post action='/api/watches/{escape(view['watch'])}/{verb}' class=act>"
                  f"<input type=hidden name=csrf_token><button>{verb} this watch</button></form>")
    body_html = (f"<p>{escape(view['directory'])} &rarr; {escape(view['evaluator'])}"
                 f"{' <b>(paused)</b>' if view['paused'] else ''}</p>{toggle}<p>{view['total']} checkpoints: {counts}</p>"
                 f"<ul>{best}</ul><div>{curves}</div>{pager}<table>{head}{''.join(body)}</table>{pager}" + CSRF_SCRIPT)
    busy = any(view["counts"][s] for s in ("writing", "queued", "running", "retrying"))
    return _page(f"Watch {view['watch']}", body_html, busy)


CSRF_SCRIPT = """<script>
document.querySelectorAll("form.act").forEach(function (f) { f.addEventListener("submit", function () {
  var m = document.cookie.match(/(?:^|; )_csrf_token=([^;]*)/); f.csrf_token.value = m ? m[1] : ""; }); });
</script>"""
"""Forms send the CSRF cookie's value back as a field (the dashboard guard checks both match)."""


def _pager(view: dict[str, Any]) -> str:
    if view["pages"] == 1:
        return ""
    links = []
    for n in sorted({1, view["page"] - 1, view["page"], view["page"] + 1, view["pages"]}):
        if 1 <= n <= view["pages"]:
            label = f"<b>{n}</b>" if n == view["page"] else str(n)
            links.append(f"<a href='?page={n}'>{label}</a>")
    return f"<p>page {' '.join(links)} of {view['pages']}</p>"


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else escape(str(value))


def curve_svg(metric: str, rows: list[dict[str, Any]], best: dict[str, Any] | None,
              width: int = 420, height: int = 180) -> str:
    """``metric`` of the ok rows by step, as an inline SVG line, the best point ringed."""
    points = sorted((float(r["step"]), float(r["metrics"][metric]), r["job_id"]) for r in rows
                    if r["status"] == "ok" and r["step"] is not None and _finite(r["metrics"].get(metric)))
    if not points:
        return ""
    if len(points) > defaults.CURVE_POINTS:
        stride = len(points) / defaults.CURVE_POINTS
        points = [points[int(i * stride)] for i in range(defaults.CURVE_POINTS)] + [points[-1]]
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
    pad = 30

    def at(x: float, y: float) -> tuple[float, float]:
        px = pad + (x - x0) / ((x1 - x0) or 1) * (width - 2 * pad)
        py = height - pad - (y - y0) / ((y1 - y0) or 1) * (height - 2 * pad)
        return round(px, 1), round(py, 1)

    line = " ".join(f"{px},{py}" for px, py in (at(x, y) for x, y, _ in points))
    mark = ""
    if best is not None and best.get("step") is not None:
        bx, by = at(float(best["step"]), float(best["value"]))
        mark = (f"<circle class=best-point cx={bx} cy={by} r=5 fill=none stroke='#d62728' stroke-width=2>"
                f"<title>best: {escape(str(best['value']))} at step {best['step']}</title></circle>")
    return (f"<svg xmlns='http://www.w3.org/2000/svg' width={width} height={height} data-metric='{escape(metric)}'>"
            f"<text x={pad} y=16 font-size=13>{escape(metric)}</text>"
            f"<text x=2 y={pad + 4} font-size=10>{_fmt(y1)}</text><text x=2 y={height - pad} font-size=10>{_fmt(y0)}</text>"
            f"<text x={pad} y={height - 8} font-size=10>{_fmt(x0)}</text>"
            f"<text x={width - pad} y={height - 8} font-size=10 text-anchor=end>step {_fmt(x1)}</text>"
            f"<polyline fill=none stroke='#1f77b4' stroke-width=1.5 points='{line}'/>{mark}</svg>")


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@blueprint.get("/metrics")
def metrics() -> Response:
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    from .exporter import registry

    return Response(generate_latest(registry(_conn(), _settings())), mimetype=CONTENT_TYPE_LATEST.split(";")[0],
                    headers={"Content-Type": CONTENT_TYPE_LATEST})

