"""Measure the Evaluate page against plain ``/predictions`` calls (issue 12's speed target).

    .venv/bin/python scripts/bench_evaluate_page.py [--images 50] [--size 512] [--model demo] [--timeout 300]

Starts a real TorchServe serving ``model_store/<model>.mar`` (``make model-store`` builds it) and a real
``streamlit run ui/app.py`` whose "Bundled phantom test set" is a phantom set of ``--images`` images
with lesion masks, then in Debian chromium (Playwright) runs a CAM-only evaluation of that set and
times it from the click on Run to the summary on the page. Side by side, in the same run, it times
``--images`` plain ``/predictions`` calls (one after the other, as a script would) of another phantom
set of the same size and kind. Each set is new to the server, so neither side reads the server's
feature cache. Prints both times and their ratio (target <= 1.5) and writes them to
``test-artifacts/bench-evaluate-page.json`` (no summary within ``--timeout`` s: a screenshot of the
page in ``test-artifacts/bench-evaluate-page-failure.png``). Not a test (times are never asserted);
docs/bench.md.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def lesion_set(folder: Path, images: int, seed: int, size: int) -> list[Path]:
    """A dataset folder of ``images`` phantoms that have a lesion mask (normals dropped from the
    manifest); returns the image paths."""
    from deepminer.data.phantoms import generate_dataset

    generate_dataset(folder, images * 2 + 10, seed, size, splits={"test": 1.0}, jobs=2)
    rows = list(csv.DictReader((folder / "manifest.csv").open()))
    keep = [r for r in rows if r.get("lesion_mask")][:images]
    if len(keep) < images:
        raise SystemExit(f"only {len(keep)} phantoms with a lesion in {folder}")
    with (folder / "manifest.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(keep)
    return [folder / r["image"] for r in keep]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=50, help="images in each set (default 50)")
    ap.add_argument("--size", type=int, default=512, help="phantom height in px (default 512, as the atlas set)")
    ap.add_argument("--model", default="demo", help="model_store/<MODEL>.mar (default demo)")
    ap.add_argument("--max-side", type=int, default=1024, help="max_side of every request (the workbench default)")
    ap.add_argument("--timeout", type=int, default=300, help="seconds to wait for the summary (default 300)")
    args = ap.parse_args(argv)
    chromium = shutil.which("chromium")
    mar = ROOT / "model_store" / f"{args.model}.mar"
    if not chromium or not mar.is_file():
        print(f"needs Debian chromium and {mar} (make model-store)", file=sys.stderr)
        return 2
    from playwright.sync_api import sync_playwright

    from deepminer.client import Client
    from serve.launch import TorchServe, free_port
    from serve.workbench import NOT_RUNNING, VIEWPORT, idle, launch_chromium, streamlit_app

    work = Path(tempfile.mkdtemp(prefix="deepminer-bench-eval-"))
    plain_paths = lesion_set(work / "plain", args.images, 41, args.size)
    lesion_set(work / "page", args.images, 42, args.size)
    out: dict[str, object] = {"images": args.images, "phantom_height_px": args.size, "model": args.model,
                              "max_side": args.max_side}
    with TorchServe(ROOT / "model_store", {args.model: mar.name}, work / "ts", profile="demo") as ts:
        with Client(ts.inference_url, model=args.model, timeout=300) as c:
            c.explain(plain_paths[0].read_bytes(), max_side=args.max_side)  # a warm worker, like the page's
            t0 = time.perf_counter()
            for p in plain_paths[1:]:
                c.explain(p.read_bytes(), max_side=args.max_side)
            per_call = (time.perf_counter() - t0) / (len(plain_paths) - 1)
        out["plain_predictions_s"] = round(per_call * args.images, 2)
        port = free_port()
        env = {**os.environ, "DEEPMINER_SERVE_URL": ts.inference_url, "DEEPMINER_MODEL": args.model,
               "DEEPMINER_MANAGEMENT_URL": ts.management_url,
               "DEEPMINER_BACKEND": "serve", "DEEPMINER_LABELS_URL": f"sqlite:///{work / 'labels.db'}",
               "DEEPMINER_SAMPLES": str(work / "page"), "DEEPMINER_MAX_SIDE": str(args.max_side)}
        with streamlit_app(env, port, work) as url, sync_playwright() as pw:
            browser = launch_chromium(pw)
            try:
                page = browser.new_page(viewport=VIEWPORT)
                page.goto(url)
                page.get_by_text("Upload a mammogram").wait_for(timeout=120_000)
                idle(page, 120_000)
                page.locator('[data-testid="stSidebarNavLink"]', has_text="Evaluate").first.click()
                page.get_by_text("Evaluate explanations", exact=True).wait_for(timeout=60_000)
                idle(page, 120_000)
                page.locator('[data-testid="stRadio"] label', has_text="A set of images with masks").click()
                idle(page, 120_000)
                page.locator('[data-testid="stRadio"] label', has_text="Bundled phantom test set").click()
                page.get_by_text(f"{args.images} image(s) with a mask").wait_for(timeout=300_000)
                idle(page, 120_000)
                t0 = time.perf_counter()
                page.get_by_role("button", name="Run", exact=True).click()
                try:
                    page.get_by_text(f"Summary over {args.images} images").wait_for(timeout=args.timeout * 1000)
                except Exception:
                    shot = ROOT / "test-artifacts" / "bench-evaluate-page-failure.png"
                    shot.parent.mkdir(exist_ok=True)
                    page.screenshot(path=str(shot), full_page=True)
                    print(f"no summary after {args.timeout} s: the page is in {shot}", file=sys.stderr)
                    raise
                page.wait_for_function(NOT_RUNNING, timeout=60_000)
                out["evaluate_click_to_summary_s"] = round(time.perf_counter() - t0, 2)
                caption = page.get_by_text(re.compile(r"^Evaluated \d+ images in")).first.inner_text()
                out["page_run_loop_s"] = float(re.search(r"in ([\d.]+) s", caption).group(1))  # the loop alone
            finally:
                browser.close()
    out["ratio"] = round(float(out["evaluate_click_to_summary_s"]) / float(out["plain_predictions_s"]), 2)
    shutil.rmtree(work, ignore_errors=True)
    dest = ROOT / "test-artifacts" / "bench-evaluate-page.json"
    dest.parent.mkdir(exist_ok=True)
    dest.write_text(json.dumps(out, indent=1) + "\n")
    print(f"Evaluate page, CAM only, {args.images} phantoms ({args.size} px): {out['evaluate_click_to_summary_s']} s "
          f"click -> summary; {args.images} plain /predictions: {out['plain_predictions_s']} s; "
          f"ratio {out['ratio']} (target <= 1.5); the page's loop over the images {out['page_run_loop_s']} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
