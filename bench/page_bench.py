"""The checkpoint page and its API for a watch of 10,000 checkpoints: seconds per render (printed, not a test).

    python bench/page_bench.py [--checkpoints 10000] [--repeat 5]

Fills a fresh redis-server with a watch whose ledger and results hold N evaluated checkpoints (a
few failed), then times, through the dashboard's own Flask app (auth included), the watch page
(first page of 100 rows, two SVG curves), the JSON page, the watches page and /metrics. Writes
bench/out/page.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from base64 import b64encode
from pathlib import Path

import redis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from assayer import keys, records  # noqa: E402
from assayer.dashboard import make_app  # noqa: E402
from assayer.records import LedgerEntry  # noqa: E402
from assayer.settings import Settings  # noqa: E402
from assayer.stack import redis_binary  # noqa: E402
from assayer.watches import WatchSpec  # noqa: E402

OUT = ROOT / "bench" / "out"


def fill(conn: redis.Redis, n: int) -> None:
    spec = WatchSpec("big", "/checkpoints/big", f"{ROOT / 'bench' / 'evaluators.py'}:noop")
    conn.hset(keys.WATCHES, spec.name, spec.to_json())
    with conn.pipeline(transaction=False) as pipe:
        for i in range(n):
            relpath, job = f"checkpoint-{(i + 1) * 10}/model.safetensors", f"ev-{i:032x}"
            pipe.hset(keys.ledger("big"), relpath, LedgerEntry(f"v{i}", job, time.time()).to_json())
            rec = records.new_attempt(job, {"watch": "big", "checkpoint": f"/checkpoints/big/{relpath}",
                                            "relpath": relpath, "version": f"v{i}", "step": (i + 1) * 10}, 1,
                                      "eval-1", records.utcnow())
            failed = i % 500 == 7
            done = records.finish(rec, "failed" if failed else "ok", True, "ValueError: bad" if failed else None,
                                  metrics={} if failed else {"loss": 1 / (i + 1), "accuracy": i / n},
                                  traceback="Traceback ...\nValueError: bad" if failed else None, duration=1.5)
            pipe.hset(keys.results("big"), job, records.dump(done))
            if i % 1000 == 999:
                pipe.execute()
        pipe.execute()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--checkpoints", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        port = 16379 + int(time.time()) % 1000
        server = subprocess.Popen([redis_binary(), "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                   "--appendonly", "no", "--dir", tmp], stdout=subprocess.DEVNULL)
        try:
            conn = redis.Redis.from_url(f"redis://127.0.0.1:{port}/0")
            for _ in range(100):
                try:
                    conn.ping()
                    break
                except redis.ConnectionError:
                    time.sleep(0.05)
            fill(conn, args.checkpoints)
            settings = Settings(redis_url=f"redis://127.0.0.1:{port}/0", home=Path(tmp), dashboard_password="bench")
            client = make_app(settings).test_client()
            auth = {"Authorization": "Basic " + b64encode(b"assayer:bench").decode()}
            figures = {}
            for label, path in (("watch page", "/checkpoints/big"), ("watch page 50", "/checkpoints/big?page=50"),
                                ("checkpoints json", "/api/watches/big/checkpoints"),
                                ("watches page", "/checkpoints/"), ("metrics", "/metrics")):
                times = []
                for _ in range(args.repeat):
                    started = time.perf_counter()
                    reply = client.get(path, headers=auth)
                    times.append(time.perf_counter() - started)
                    assert reply.status_code == 200, (path, reply.status_code)
                figures[label] = {"median_s": round(statistics.median(times), 3), "max_s": round(max(times), 3)}
                print(f"{label:18s} {args.checkpoints} checkpoints: median {figures[label]['median_s']:.3f} s, "
                      f"max {figures[label]['max_s']:.3f} s")
        finally:
            server.terminate()
            server.wait(10)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "page.json").write_text(json.dumps({"checkpoints": args.checkpoints, "machine": platform.processor() or
                                               platform.machine(), "figures": figures}, indent=2))


if __name__ == "__main__":
    main()
