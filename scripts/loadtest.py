"""A load test a lab can run against the lab profile, over its proxy (locust; bounded in users and time).

    .venv/bin/python scripts/loadtest.py --url https://127.0.0.1:8443 --cacert var/proxy/tls/cert.pem \\
        --user alice:PASSWORD --user bob:PASSWORD --users 6 --time 120

Each simulated user signs in once (the sign-in form: one password check, then the session cookie) and
then, with 0.5-2 s between calls, explains (``POST /api/predictions``), sketches (the same with a
sketch and every unit map), evaluates (``POST /api/explanations``: Grad-CAM + Integrated Gradients, the
peer saliency of the Evaluate page, in the model's heavy pool) and labels units (the label store the
workbench writes, as the signed-in name; under the model name ``loadtest`` and this run's id, so a
lab's own labels are never touched). The report: p50/p95 per request kind, the errors (must be 0)
and whether every label written is in the store afterwards (none lost). Exit 0 only when both hold.

This file is both the runner (run it with python) and the locustfile (locust runs it in a child
process: locust's gevent patches the process it runs in). Only loopback or the lab's own proxy.
"""
from __future__ import annotations

import argparse
import base64
import io
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KINDS = ("sign in", "explain", "sketch", "evaluate", "label")
LOAD_MODEL = "loadtest"  #: the label store's model name for this test's labels


def _images(folder: Path, n: int, size: int) -> list[Path]:
    """``n`` phantom mammograms (8-bit PNG) of ``size`` px."""
    import numpy as np
    from PIL import Image

    from deepminer.data.phantoms import render_phantom

    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        img = np.asarray(render_phantom(100 + i, i % 3, size=size).image, np.float32)
        img = (255 * (img - img.min()) / max(float(np.ptp(img)), 1e-6)).astype(np.uint8)
        path = folder / f"phantom-{i}.png"
        Image.fromarray(img).save(path)
        out.append(path)
    return out


def _report(tally: dict, labels: dict) -> tuple[str, bool]:
    """The per-kind table from the locust process's own tally (every request, those that ended while
    locust waited for the users' last tasks included: its CSV is written before they end)."""
    import numpy as np

    lines = [f"{'kind':<12} {'requests':>8} {'errors':>6} {'p50 ms':>8} {'p95 ms':>8}"]
    errors = 0
    for name in sorted(tally):
        r = tally[name]
        errors += int(r["failures"])
        p50, p95 = (np.percentile(r["ms"], [50, 95]) if r["ms"] else (float("nan"), float("nan")))
        lines.append(f"{name:<12} {r['requests']:>8} {r['failures']:>6} {p50:>8.0f} {p95:>8.0f}")
    seen = {name for name, r in tally.items() if r["requests"] > 0}
    lost = labels["written"] - labels["stored"]
    lines.append(f"labels: {labels['written']} written, {labels['stored']} in the store, {lost} lost")
    lines.append(f"errors: {errors}")
    ok = errors == 0 and lost == 0 and labels["written"] > 0 and set(KINDS) <= seen
    if not set(KINDS) <= seen:
        lines.append(f"kinds never run: {', '.join(sorted(set(KINDS) - seen))} (run longer or with more users)")
    return "\n".join(lines), ok


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="scripts/loadtest.py", description=__doc__.splitlines()[0])
    ap.add_argument("--url", required=True, help="the lab proxy, e.g. https://127.0.0.1:8443")
    ap.add_argument("--user", action="append", required=True, metavar="NAME:PASSWORD",
                    help="an account of the lab (repeatable; simulated users take them in turn)")
    ap.add_argument("--cacert", help="the proxy's certificate (PEM); without it TLS is not verified")
    ap.add_argument("--model", default="demo", help="the served model (default demo)")
    ap.add_argument("--users", type=int, default=4, help="simulated users at once (1-50, default 4)")
    ap.add_argument("--time", type=int, default=30, help="seconds of load (5-1800, default 30)")
    ap.add_argument("--size", type=int, default=512, help="phantom side in px (default 512)")
    ap.add_argument("--labels-url", help="the label store (SQLAlchemy URL; default: a temporary SQLite file)")
    ap.add_argument("--out", type=Path, help="folder for locust's CSV files and the report (default: a temp folder)")
    args = ap.parse_args(argv)
    if not 1 <= args.users <= 50 or not 5 <= args.time <= 1800:
        ap.error("--users must be 1-50 and --time 5-1800 (a bounded test)")
    if any(":" not in u for u in args.user):
        ap.error("--user takes NAME:PASSWORD")
    out = args.out or Path(tempfile.mkdtemp(prefix="deepminer-load-"))
    out.mkdir(parents=True, exist_ok=True)
    run_id = uuid.uuid4().hex[:12]
    labels_url = args.labels_url or f"sqlite:///{out / 'labels.db'}"
    images = _images(out / "images", 4, args.size)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "DEEPMINER_LOAD_CREDS": json.dumps(args.user),
           "DEEPMINER_LOAD_MODEL": args.model, "DEEPMINER_LOAD_IMAGES": json.dumps([str(p) for p in images]),
           "DEEPMINER_LOAD_RUN": run_id, "DEEPMINER_LABELS_URL": labels_url,
           "DEEPMINER_LOAD_CACERT": args.cacert or "", "DEEPMINER_LOAD_TALLY": str(out / "tally.json")}
    cmd = [sys.executable, "-m", "locust", "-f", __file__, "--headless", "--host", args.url.rstrip("/"),
           "-u", str(args.users), "-r", str(args.users), "-t", f"{args.time}s", "--stop-timeout", "120",
           "--csv", str(out / "load"), "--only-summary", "--loglevel", "WARNING"]
    print(f"load test: {args.users} users for {args.time} s against {args.url} (model {args.model}); files in {out}",
          flush=True)
    t0 = time.monotonic()
    proc = subprocess.run(cmd, env=env, cwd=ROOT, timeout=args.time + 300)
    from deepminer.labels import LabelStore

    tally = json.loads((out / "tally.json").read_text()) if (out / "tally.json").is_file() else {}
    store = LabelStore(labels_url)
    stored = len(store.history(LOAD_MODEL, run_id))
    store.close()
    text, ok = _report(tally.get("kinds", {}), {"written": int(tally.get("labels_written", 0)), "stored": stored})
    text = f"{args.users} users, {args.time} s ({time.monotonic() - t0:.0f} s with start and stop)\n{text}"
    (out / "report.txt").write_text(text + "\n", encoding="utf-8")
    print(text)
    return 0 if ok and proc.returncode in (0, 1) else 1  # locust exits 1 when a request failed: counted above


# -- the locustfile (imported by locust in its own process) -------------------------------------------
if __name__ != "__main__":
    from locust import HttpUser, between, events, task

    _CREDS = itertools.cycle([tuple(c.split(":", 1)) for c in json.loads(os.environ.get("DEEPMINER_LOAD_CREDS", "[]"))])
    _IMAGES = [Path(p).read_bytes() for p in json.loads(os.environ.get("DEEPMINER_LOAD_IMAGES", "[]"))]
    _MODEL = os.environ.get("DEEPMINER_LOAD_MODEL", "demo")
    _WRITTEN = {"n": 0}

    def _sketch_png() -> bytes:
        import numpy as np
        from PIL import Image

        m = np.zeros((64, 48), np.uint8)
        m[20:36, 12:28] = 255
        buf = io.BytesIO()
        Image.fromarray(m).save(buf, format="PNG")
        return buf.getvalue()

    _SKETCH = base64.b64encode(_sketch_png()).decode()

    _TALLY: dict[str, dict] = {}

    @events.request.add_listener
    def _record(name: str, response_time: float, exception: object = None, **_: object) -> None:
        r = _TALLY.setdefault(name, {"requests": 0, "failures": 0, "ms": []})
        r["requests"] += 1
        r["failures"] += exception is not None
        r["ms"].append(float(response_time))

    @events.quitting.add_listener
    def _dump(**_: object) -> None:
        # at quitting, after the users' last tasks (--stop-timeout) have ended: every request and label counted
        path = os.environ.get("DEEPMINER_LOAD_TALLY")
        if path:
            Path(path).write_text(json.dumps({"labels_written": _WRITTEN["n"], "kinds": _TALLY}))

    class LabUser(HttpUser):
        wait_time = between(0.5, 2.0)

        def on_start(self) -> None:
            self.name, password = next(_CREDS)
            self.client.verify = os.environ.get("DEEPMINER_LOAD_CACERT") or False
            self.client.trust_env = False
            self.n = 0
            with self.client.post("/signin", data={"name": self.name, "password": password, "next": "/"},
                                  allow_redirects=False, name="sign in", catch_response=True) as r:
                if r.status_code != 303 or "deepminer_session" not in r.headers.get("Set-Cookie", ""):
                    r.failure(f"sign-in answered {r.status_code}")
            from deepminer.labels import LabelStore

            self.store = LabelStore(os.environ["DEEPMINER_LABELS_URL"])
            self.on_start_kinds()

        def on_stop(self) -> None:
            self.store.close()

        def _image(self) -> bytes:
            self.n += 1
            return _IMAGES[self.n % len(_IMAGES)]

        def _post(self, path: str, kind: str, options: dict | None) -> None:
            files = {"data": ("image.png", self._image(), "application/octet-stream")}
            if options:
                files["options"] = (None, json.dumps(options), "application/json")  # type: ignore[assignment]  # requests' (name, data, type) tuple
            with self.client.post(path, files=files, name=kind, catch_response=True, timeout=300) as r:
                if r.status_code != 200:
                    r.failure(f"{r.status_code}: {r.text[:200]}")

        # each user's first tasks are one of every kind (a short run still exercises them all, the
        # evaluation included); after that locust picks them at random, weighted 4 : 3 : 1 : 2
        def on_start_kinds(self) -> None:
            for kind in (self.explain, self.sketch, self.evaluate, self.label):
                kind()
                self.wait()

        @task(4)
        def explain(self) -> None:
            self._post(f"/api/predictions/{_MODEL}", "explain", None)

        @task(3)
        def sketch(self) -> None:
            self._post(f"/api/predictions/{_MODEL}", "sketch", {"sketch": _SKETCH, "unit_maps": "all"})

        @task(1)
        def evaluate(self) -> None:
            self._post(f"/api/explanations/{_MODEL}", "evaluate", {"methods": ["gradcam", "integrated_gradients"]})

        @task(2)
        def label(self) -> None:
            t0 = time.perf_counter()
            err = None
            try:
                self.store.set_labels(LOAD_MODEL, os.environ["DEEPMINER_LOAD_RUN"], [self.n % 32],
                                      f"load concept {self.n % 5}", self.name, source="loadtest")
                _WRITTEN["n"] += 1
            except Exception as e:  # noqa: BLE001 - any failure is one error of the report
                err = e
            events.request.fire(request_type="STORE", name="label", response_time=(time.perf_counter() - t0) * 1000,
                                response_length=0, exception=err, context={})


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    raise SystemExit(main())
