"""The job file (deepminer/jobs.py) and the in-process request path with a job: progress written
between steps, cancel by id and by group, a client's missing heartbeat, the model given back as
found after a cancel. The served path: tests/test_serve_jobs.py."""
from __future__ import annotations

import threading
import time

import pytest

from deepminer.jobs import JobCancelled, JobStore, check_id, heartbeat, new_id
from deepminer.errors import InputError
from modelfixtures import breast_png, tiny_checkpoint


@pytest.fixture
def store(tmp_path):
    return JobStore(tmp_path / "jobs.sqlite")


def test_rows_progress_cancel_and_finish(store):
    job = new_id()
    assert check_id(job) == job and store.get(job) is None
    store.create(job, group="run-1")
    assert store.get(job)["state"] == "queued"
    tr = store.tracker(job)
    tr.begin(4, "explain")
    tr.step("gradcam")
    row = store.get(job)
    assert (row["state"], row["done"], row["total"], row["step"], row["fraction"]) == ("running", 1, 4, "gradcam", 0.25)
    assert store.cancel_group("run-1") == 1
    with pytest.raises(JobCancelled, match="cancelled after 2 of 4 steps") as err:
        tr.step("gradcam")
    assert err.value.status == 409 and err.value.kind == "Cancelled"
    tr.finish("cancelled", str(err.value))
    assert store.get(job)["state"] == "cancelled"
    assert store.cancel(job) is False and store.cancel(new_id()) is False  # finished / unknown: nothing to do
    assert (store.path.stat().st_mode & 0o777) == 0o600


def test_a_missing_heartbeat_stops_the_job_and_a_beating_client_keeps_it(store):
    job = new_id()
    store.create(job)
    tr = store.tracker(job, heartbeat_s=0.6)
    tr.begin(10)
    with heartbeat(store, job, every_s=0.1):
        for _ in range(5):
            time.sleep(0.2)
            tr.step("smoothgrad")  # touched all along: no cancel
    time.sleep(0.8)
    with pytest.raises(JobCancelled, match="stopped waiting"):
        tr.step("smoothgrad")
    assert store.get(job)["reason"] == "client gone"


def test_a_job_the_client_did_not_make_still_has_progress_and_cancel(store):
    tr = store.tracker("made-by-the-server")
    tr.begin(2)
    assert store.get("made-by-the-server")["state"] == "running"
    time.sleep(0.05)
    tr.check()  # no heartbeat to miss
    assert store.cancel("made-by-the-server") is True


def test_a_signed_in_user_may_name_only_a_job_of_its_own(store):
    from deepminer.errors import DeepMinerError
    from deepminer.jobs import check_owner

    mine, theirs, hosts = new_id(), new_id(), new_id()
    assert store.create(mine, owner="alice") and store.create(theirs, owner="bob") and store.create(hosts)
    check_owner(store, mine, "alice")
    for user, job in (("alice", theirs), ("alice", hosts), ("alice", new_id()), ("bob", mine)):
        with pytest.raises(DeepMinerError, match="options.job: no job") as err:
            check_owner(store, job, user)
        assert err.value.status == 404 and err.value.kind == "JobNotFound"
    for job in (mine, theirs, hosts, new_id()):  # no signed-in user (the host's own clients): no check
        check_owner(store, job, None)
        check_owner(store, job, "")


def test_bad_job_ids_are_refused():
    for bad in ("short", "a b c d e f g h", "x" * 65, 5, None):
        with pytest.raises(InputError, match="options.job"):
            check_id(bad)


def test_the_service_stops_a_cancelled_job_between_steps_and_serves_the_next(tmp_path, monkeypatch):
    import torch

    from deepminer.client import LocalClient

    monkeypatch.setenv("DEEPMINER_JOBS", str(tmp_path / "jobs.sqlite"))
    client = LocalClient(tiny_checkpoint(tmp_path), name="tiny")
    image = breast_png(256, 192, seed=1)
    methods = ["integrated_gradients", "smoothgrad"]
    full = client.explain_methods(image, methods)
    job = new_id()
    out: dict = {}

    def go() -> None:
        try:
            client.explain_methods(image, methods, job=job)
        except JobCancelled as err:
            out["err"] = err

    t = threading.Thread(target=go)
    t.start()
    deadline = time.monotonic() + 60
    while (client.job(job) or {}).get("done", 0) < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert client.cancel(job) is True
    t.join(60)
    row = client.job(job)
    assert "err" in out and row["state"] == "cancelled" and row["done"] < row["total"], (out, row)
    model = client.service.model
    assert not model.training and all(p.grad is None for p in model.parameters())
    assert not model._forward_hooks and not model._forward_pre_hooks  # the job's hooks are gone
    again = client.explain_methods(image, methods)
    for m in methods:
        assert torch.allclose(torch.from_numpy(again.method_maps[m]), torch.from_numpy(full.method_maps[m]))
    assert client.job(job)["state"] == "cancelled"


class _CountingJob:
    """A job that counts its checks and raises at check number ``stop_at``."""

    def __init__(self, stop_at: int = 0):
        self.checks, self.steps, self.stop_at = 0, 0, stop_at

    def check(self) -> None:
        self.checks += 1
        if self.checks == self.stop_at:
            raise JobCancelled("job test: cancelled")

    def step(self, name: str) -> None:
        self.steps += 1


def test_the_cancel_is_read_inside_a_pass_forward_and_backward(tmp_path, monkeypatch):
    """Inside a pass the cancel is read after each backbone module's forward and when its output's
    gradient is computed (a cancel raised there in the backward pass still arrives as JobCancelled),
    the maps are the same with and without the checks, and the hooks are gone afterwards."""
    import numpy as np

    from deepminer.data.io import load_image
    from deepminer.explain import service as service_mod
    from deepminer.explain.service import ExplainService

    monkeypatch.setattr(service_mod, "INNER_CHECK_S", 0.0)
    svc = ExplainService.load(tiny_checkpoint(tmp_path))
    pixels = load_image(breast_png(256, 192, seed=2)).pixels
    plain = svc._gradient_map("guided_backprop", pixels, 0, 256)
    counting = _CountingJob()
    checked = svc._gradient_map("guided_backprop", pixels, 0, 256, counting)
    assert np.array_equal(plain, checked)
    modules = sum(1 for m in svc.model.features.modules() if m is not svc.model.features)
    assert counting.steps == 1 and counting.checks >= 2 * modules - 2, (counting.checks, modules)  # forward + backward
    stopper = _CountingJob(stop_at=counting.checks - 1)  # among the last: the backward pass
    with pytest.raises(JobCancelled):
        svc._gradient_map("guided_backprop", pixels, 0, 256, stopper)
    model = svc.model
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    assert all(p.grad is None for p in model.parameters())
    assert np.array_equal(svc._gradient_map("guided_backprop", pixels, 0, 256), plain)


def test_the_page_words_a_jobs_progress():
    from ui.logic import job_progress

    assert job_progress(None, 1.4) == (0.0, "Sent to the model server · 1 s")
    assert job_progress({"state": "queued", "elapsed_s": 3.2})[1].startswith("Waiting for the model server")
    frac, words = job_progress({"state": "running", "step": "integrated_gradients", "done": 3, "total": 8,
                                "fraction": 0.375, "elapsed_s": 12.4})
    assert frac == 0.375 and words == "integrated gradients · step 3 of 8 · 12 s"


def test_make_run_gives_the_workers_and_the_workbench_one_job_file(monkeypatch):
    from serve.launch import SERVE_DIR, profile_env

    monkeypatch.delenv("DEEPMINER_JOBS", raising=False)
    root = SERVE_DIR.parent
    for profile in ("demo", "lab"):
        assert profile_env(profile, 8501)["DEEPMINER_JOBS"] == str(root / "var" / "jobs.sqlite")
    serve_sh = (root / "scripts" / "serve.sh").read_text()
    assert "export DEEPMINER_JOBS=${DEEPMINER_JOBS:-$ROOT/var/jobs.sqlite}" in serve_sh


def test_the_jobs_command_lists_shows_and_cancels(store, capsys):
    from deepminer.cli import main

    job, done = new_id(), new_id()
    store.create(job)
    store.tracker(job).begin(5, "integrated_gradients")
    store.create(done)
    store.tracker(done).finish("done")
    f = ["jobs", "--file", str(store.path)]
    assert main([*f, "list"]) == 0
    out = capsys.readouterr().out
    assert job in out and done not in out and "running" in out and "0/5 steps" in out
    assert main([*f, "list", "--all"]) == 0
    assert done in capsys.readouterr().out
    remote = new_id()
    assert store.create(remote, owner="alice") and not store.create(remote, owner="bob")  # the jobs API's rows
    assert main([*f, "show", remote]) == 0 and "by alice" in capsys.readouterr().out
    assert main([*f, "cancel", job]) == 0
    assert store.get(job)["cancel"] == 1
    assert main([*f, "cancel", job]) == 2  # asked already: nothing to cancel
    assert main([*f, "cancel", done]) == 2
    assert main([*f, "cancel", "no-such-job"]) == 2
    err = capsys.readouterr().err
    assert f"job {done} is done: nothing to cancel" in err and "no job 'no-such-job'" in err


def test_a_job_file_made_before_owners_gets_the_column(tmp_path):
    """A job file written by an older version (no ``owner`` column) is upgraded when it is opened."""
    import sqlite3

    path = tmp_path / "old.sqlite"
    con = sqlite3.connect(path)
    con.execute("CREATE TABLE jobs (id TEXT PRIMARY KEY, grp TEXT, state TEXT NOT NULL, step TEXT, done INTEGER "
                "NOT NULL DEFAULT 0, total INTEGER NOT NULL DEFAULT 0, created REAL NOT NULL, started REAL, "
                "updated REAL NOT NULL, heartbeat REAL, cancel INTEGER NOT NULL DEFAULT 0, reason TEXT, message TEXT)")
    now = time.time()  # (a finished job older than a day would be forgotten by create)
    con.execute("INSERT INTO jobs (id, state, created, updated) VALUES ('oldjob01', 'done', ?, ?)", (now, now))
    con.commit()
    con.close()
    store = JobStore(path)
    job = new_id()
    assert store.create(job, owner="alice")
    assert store.get(job)["owner"] == "alice" and store.get("oldjob01")["owner"] is None
