"""The Evaluate page's set runner (:class:`ui.evaluate.SetScheduler`) without Streamlit or a model: a
fake ``work`` stands for an image's calls and scores. Answers are taken in item order, the look-ahead
is bounded, Cancel stops after the image being taken, an image's error is that image's problem, and a
run interrupted from its progress callback (a click's rerun) carries on where it stopped."""
from __future__ import annotations

import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import pytest

from deepminer.errors import InputError
from ui import evaluate as ev


class FakeWork:
    """``work(item, answered)``: a call that takes ``delay(index)`` seconds, then its scores. Counts
    the calls waiting at once and how far past the taken image each one was asked for."""

    def __init__(self, run: ev.SetRun, delay=lambda i: 0.0, fail: dict | None = None, gate: dict | None = None):
        self.run, self.delay, self.fail, self.gate = run, delay, fail or {}, gate or {}
        self.lock = threading.Lock()
        self.in_flight = self.max_in_flight = self.max_ahead = 0
        self.started: list[int] = []

    def __call__(self, item, answered) -> ev.Answer:
        i = item.index
        with self.lock:
            self.started.append(i)
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            self.max_ahead = max(self.max_ahead, i - self.run.done)
        try:
            if i in self.gate:
                assert self.gate[i].wait(10)
            time.sleep(self.delay(i))
        finally:
            with self.lock:
                self.in_flight -= 1
            answered()
        if i in self.fail:
            raise self.fail[i]
        rec = ev.ImageRecord(item.image_id, None, "benign", targets={"predicted": "benign"},
                             scores={"cam": {"predicted": {"auprc": i / 10}}})
        return ev.Answer(rec, {"name": "tiny"}, 0.001)


def _run(n: int) -> ev.SetRun:
    items = [SimpleNamespace(image_id=f"i{k}", label=None, index=k) for k in range(n)]
    return ev.SetRun(items, ("cam", "class_map"), "prediction", {"source": "test"})


@pytest.fixture
def pool():
    with ThreadPoolExecutor(ev.AHEAD) as p:
        yield p


def test_answers_are_taken_in_item_order(pool):
    run = _run(12)
    rng = random.Random(0)
    delays = [rng.uniform(0, 0.03) for _ in range(12)]
    delays[0] = 0.1  # the first image answers last of its batch
    ev.SetScheduler(pool, FakeWork(run, lambda i: delays[i])).advance(run)
    assert [r.image_id for r in run.records] == [f"i{k}" for k in range(12)]
    assert run.done == 12 and not run.running and not run.cancelled and run.error is None
    assert run.model == {"name": "tiny"} and run.request_s == pytest.approx(0.012)


@pytest.mark.parametrize("lookahead, ahead", [(3, 8), (1, 1), (2, 5)])
def test_look_ahead_is_bounded(pool, lookahead, ahead):
    run = _run(20)
    work = FakeWork(run, lambda i: 0.01)
    ev.SetScheduler(pool, work, lookahead=lookahead, ahead=ahead).advance(run)
    assert run.done == 20
    assert work.max_in_flight == lookahead  # reached, never passed
    assert work.max_ahead < ahead
    assert sorted(work.started) == list(range(20))  # each image asked for once


def test_cancel_stops_after_the_image_being_taken(pool):
    run = _run(12)
    gate = {3: threading.Event()}
    work = FakeWork(run, gate=gate)
    t = threading.Thread(target=ev.SetScheduler(pool, work, lookahead=2, ahead=4).advance, args=(run,))
    t.start()
    while run.done < 3:  # the run now waits for image 3
        time.sleep(0.005)
    run.cancel()
    gate[3].set()  # image 3 comes back: it is kept, and nothing after it
    t.join(10)
    assert not t.is_alive()
    assert run.cancelled and not run.running and run.error is None
    assert run.done == 4 and [r.image_id for r in run.records] == ["i0", "i1", "i2", "i3"]
    assert max(work.started) < 3 + 4  # never asked past the look-ahead


def test_cancel_from_the_progress_callback(pool):
    run = _run(10)
    ev.SetScheduler(pool, FakeWork(run), progress_every_s=0).advance(
        run, lambda r: r.cancel() if r.done == 2 else None)
    assert run.cancelled and run.done == 2 and len(run.records) == 2


def test_an_images_error_is_its_problem_and_the_run_goes_on(pool):
    run = _run(6)
    work = FakeWork(run, fail={2: InputError("i2.png: not an image (UnidentifiedImageError)")})
    ev.SetScheduler(pool, work).advance(run)
    assert run.done == 6 and run.error is None and not run.running
    bad = run.records[2]
    assert bad.image_id == "i2" and not bad.scored and bad.problem == "i2.png: not an image (UnidentifiedImageError)"
    assert [r.scored for r in run.records] == [True, True, False, True, True, True]


def test_an_error_that_stops_the_run_says_why(pool):
    run = _run(6)
    work = FakeWork(run, fail={1: ConnectionError("refused")})
    ev.SetScheduler(pool, work).advance(run)
    assert not run.running and run.done == 1 and run.error == "The run stopped: ConnectionError: refused"
    # the page's own wording decides (here: every error stops the run)
    run = _run(6)
    work = FakeWork(run, fail={3: InputError("bad")})
    ev.SetScheduler(pool, work, stop_reason=lambda err: f"stopped: {err}").advance(run)
    assert run.done == 3 and run.error == "stopped: bad" and len(run.records) == 3


class Rerun(BaseException):
    """Stands for Streamlit's rerun, raised at the page's next Streamlit call."""


def test_an_interrupted_run_carries_on_where_it_stopped(pool):
    run = _run(10)
    work = FakeWork(run, lambda i: 0.005)
    calls = {"n": 0}

    def click(r: ev.SetRun) -> None:
        calls["n"] += 1
        if calls["n"] == 3:
            raise Rerun

    with pytest.raises(Rerun):
        ev.SetScheduler(pool, work, progress_every_s=0).advance(run, click)
    assert run.running and run.done == 3 == len(run.records)
    ev.SetScheduler(pool, work, progress_every_s=0).advance(run, click)
    assert run.done == 10 and [r.image_id for r in run.records] == [f"i{k}" for k in range(10)]
    assert not run.running and run.elapsed_s > 0
