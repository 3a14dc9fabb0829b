"""Long jobs on a real TorchServe (demo profile, the tiny model, one worker): ``POST /explanations``
with a job id shows its progress while it runs, a cancel stops it at its next step (409 Cancelled)
and the same worker then answers ``/predictions`` at once, and a client killed while it waits frees
the worker once its heartbeat is older than the server's ``job_heartbeat_s`` (5 s here). Cancelling
an unknown or finished job does nothing and says so (False)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from deepminer.client import Client, ServeError

from deepminer.jobs import new_id
from modelfixtures import breast_png

pytestmark = [pytest.mark.serve, pytest.mark.slow]
MODEL = "tiny"
HEAVY = ["integrated_gradients", "smoothgrad", "guided_backprop"]
HEARTBEAT_S = 5
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_model_path):
    from serve.archive import build_mar
    from serve.launch import TorchServe

    store = tmp_path_factory.mktemp("store")
    build_mar(tiny_model_path, store, name=MODEL)
    ts = TorchServe(store, {MODEL: f"{MODEL}.mar"}, tmp_path_factory.mktemp("ts"), profile="demo",
                    env={**os.environ, "OMP_NUM_THREADS": "1", "DEEPMINER_JOB_HEARTBEAT_S": str(HEARTBEAT_S)})
    ts.start(timeout=300)
    yield ts
    ts.stop()


@pytest.fixture
def client(server):
    with Client(server.inference_url, model=MODEL, timeout=300, jobs=server.jobs_path) as c:
        c.explain(breast_png(256, 192, seed=0))  # warm
        yield c


def _run(client: Client, image: bytes, job: str, **kw) -> tuple[threading.Thread, dict]:
    out: dict = {}

    def go() -> None:
        try:
            out["exp"] = client.explain_methods(image, HEAVY, job=job, **kw)
        except Exception as err:  # noqa: BLE001 - the test reads it
            out["err"] = err
        out["t"] = time.perf_counter()

    t = threading.Thread(target=go, daemon=True)
    t.start()
    return t, out


def _wait_for(pred, timeout: float, poll: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = pred()
        if got:
            return got
        time.sleep(poll)
    raise AssertionError("timed out")


def test_progress_advances_while_the_job_runs(client):
    job = new_id()
    t, out = _run(client, breast_png(1024, 768, seed=1), job)
    seen: list[tuple[str, int, int, str]] = []
    while t.is_alive():
        row = client.job(job)
        if row and (not seen or seen[-1][:3] != (row["state"], row["done"], row["step"])):
            seen.append((row["state"], row["done"], row["step"], row["total"]))
        time.sleep(0.05)
    t.join()
    assert "err" not in out, out
    running = [s for s in seen if s[0] == "running"]
    assert len({s[1] for s in running}) >= 3, seen  # several steps seen in between
    assert {s[2] for s in running} >= {"integrated_gradients", "smoothgrad"}, seen
    final = client.job(job)
    assert final["state"] == "done" and final["done"] == final["total"] == 1 + 8 + 4 + 1, final  # explain, IG 32/4, SmoothGrad 16/4, GB
    assert set(out["exp"].method_maps) == set(HEAVY)
    assert client.cancel(job) is False  # finished: nothing to cancel


def test_cancel_stops_the_job_at_its_next_step_and_frees_the_worker(client):
    job = new_id()
    t, out = _run(client, breast_png(1024, 768, seed=2), job)
    _wait_for(lambda: (client.job(job) or {}).get("done", 0) >= 2, 120)
    t_cancel = time.perf_counter()
    assert client.cancel(job) is True
    t0 = time.perf_counter()
    client.explain(breast_png(256, 192, seed=0))  # the same (only) worker
    freed_s = time.perf_counter() - t_cancel
    predict_s = time.perf_counter() - t0
    t.join(60)
    err = out.get("err")
    assert isinstance(err, ServeError) and err.status == 409 and err.type == "Cancelled", out
    row = client.job(job)
    assert row["state"] == "cancelled" and row["done"] < row["total"], row
    answered_s = out["t"] - t_cancel
    print(f"\ncancel -> job answered 409 in {answered_s:.2f} s; cancel -> /predictions answered by the same worker "
          f"in {freed_s:.2f} s (the prediction itself {predict_s * 1000:.0f} ms); stopped after {row['done']} of "
          f"{row['total']} steps")
    assert freed_s < 4.0, freed_s  # one step (a batch of 8 Integrated Gradients steps at 1024 px) is ~1 s here
    assert client.cancel(job) is False  # cancelled already


def test_a_set_runs_cancel_stops_its_call_in_flight(client):
    """The Evaluate page's set run: its calls are one job group (fresh ids the client picks); Cancel
    stops the one in flight."""
    group = "set-" + new_id()
    out: dict = {}

    def go() -> None:
        try:
            client.explain_methods(breast_png(1024, 768, seed=6), HEAVY, group=group)
        except ServeError as err:
            out["err"] = err

    t = threading.Thread(target=go, daemon=True)
    t.start()
    def running() -> bool:
        return any(r["state"] == "running" and r["done"] >= 2 for r in client.jobs.group(group))

    _wait_for(running, 120)
    assert client.cancel_group(group) == 1
    t.join(60)
    assert getattr(out.get("err"), "status", None) == 409, out
    assert client.cancel_group(group) == 0  # nothing left running


def test_cancel_of_an_unknown_job_is_a_no_op(client):
    assert client.cancel(new_id()) is False
    assert client.job(new_id()) is None


def test_a_job_cancelled_while_queued_does_no_work(client, server):
    first, queued = new_id(), new_id()
    with Client(server.inference_url, model=MODEL, timeout=300, jobs=server.jobs_path) as other:
        t1, out1 = _run(client, breast_png(1024, 768, seed=3), first)
        _wait_for(lambda: (client.job(first) or {}).get("state") == "running", 120)
        t2, out2 = _run(other, breast_png(1024, 768, seed=5), queued)
        _wait_for(lambda: (client.job(queued) or {}).get("state") == "queued", 30)
        assert client.cancel(queued) is True
        assert client.cancel(first) is True
        t1.join(60)
        t2.join(60)
    assert getattr(out2.get("err"), "status", None) == 409, out2
    assert client.job(queued)["done"] == 0 and client.job(queued)["state"] == "cancelled"
    assert getattr(out1.get("err"), "status", None) == 409, out1


_CLIENT = """
import sys
from deepminer.client import Client
from deepminer.options import ExplainOptions
sys.path.insert(0, {tests!r})
from modelfixtures import breast_png
c = Client({url!r}, model={model!r}, timeout=300, jobs={jobs!r})
c.explain_methods(breast_png(2048, 1536, seed=4), {methods!r}, job={job!r},
                  options=ExplainOptions.build(max_side=2048))
print("finished")
"""


def test_a_killed_client_frees_the_worker(server, client, tmp_path):
    job = new_id()
    script = tmp_path / "client.py"
    script.write_text(_CLIENT.format(tests=os.path.dirname(__file__), url=server.inference_url, model=MODEL,
                                     jobs=str(server.jobs_path), methods=HEAVY, job=job))
    proc = subprocess.Popen([sys.executable, str(script)], env={**os.environ, "PYTHONPATH": str(ROOT)},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        _wait_for(lambda: (client.job(job) or {}).get("done", 0) >= 2, 120)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    _assert_freed_after_kill(client, job, "client")


# -- remote clients: through the lab's nginx and sign-in service (/api/jobs, serve/auth.py) -------------

PASSWORDS = {"alice": "alice password 1", "bob": "bobs password 22"}


@pytest.fixture(scope="module")
def lab(server):
    """nginx (TLS, sign-in) in front of this module's TorchServe, its sign-in service on the server's
    job file: a client on another machine (no job file) reaches the jobs only through ``/api/jobs``."""
    import shutil
    import tempfile

    from deepminer.commands import users as users_cmd
    from serve.launch import free_port
    from serve.proxy import Nginx, ProxyConfig

    if not (shutil.which("nginx") or Path("/usr/sbin/nginx").is_file()):
        pytest.fail("Debian nginx is missing: run `bash scripts/setup.sh` (as root) first")
    work = Path(tempfile.mkdtemp(prefix="deepminer-jobs-proxy-"))
    os.chmod(work, 0o711)  # nginx started as root runs its workers as nobody
    users_cmd.write_users(work / "users", {n: users_cmd.hash_password(p, rounds=4) for n, p in PASSWORDS.items()})
    nginx = Nginx(ProxyConfig(ui_port=free_port(), inference_port=server.ports["inference"], port=free_port(),
                              host="127.0.0.1", work=work, users_file=work / "users", heavy_pool=False,
                              jobs=server.jobs_path)).start()
    yield nginx
    nginx.stop()
    shutil.rmtree(work, ignore_errors=True)


def _remote(lab, name: str) -> Client:
    c = Client(lab.url + "/api", model=MODEL, timeout=300)  # no job file: another machine
    c.session.auth, c.session.verify, c.session.trust_env = (name, PASSWORDS[name]), False, False
    return c


def test_a_remote_client_sees_progress_and_cancels_through_the_proxy(lab, client):
    import requests
    import urllib3

    urllib3.disable_warnings(urllib3.exceptions.InsecureRequestWarning)
    alice, bob = _remote(lab, "alice"), _remote(lab, "bob")
    assert alice.jobs is None
    job = new_id()
    t, out = _run(alice, breast_png(1024, 768, seed=7), job)
    seen = set()

    def progressed() -> bool:
        row = alice.job(job) or {}
        if row.get("state") == "running":
            seen.add(row["done"])
        return row.get("done", 0) >= 3

    _wait_for(progressed, 120, poll=0.2)
    assert len(seen) >= 2, seen  # the progress advanced, read through the proxy
    assert client.job(job)["owner"] == "alice"  # the host's job file: the remote client's row
    # another user, and nobody: nothing to see or cancel
    assert bob.job(job) is None and bob.cancel(job) is False
    for auth in (None, ("alice", "not the password")):
        r = requests.get(f"{lab.url}/api/jobs/{job}", auth=auth, verify=False, timeout=10)
        assert r.status_code == 401 and r.json()["type"] == "Unauthorized", r.text
        r = requests.delete(f"{lab.url}/api/jobs/{job}", auth=auth, verify=False, timeout=10)
        assert r.status_code == 401
    r = requests.delete(f"{lab.url}/api/jobs/{job}", auth=("bob", PASSWORDS["bob"]), verify=False, timeout=10)
    assert r.status_code == 404 and r.json()["type"] == "JobNotFound"
    assert client.job(job)["state"] == "running"
    t_cancel = time.perf_counter()
    assert alice.cancel(job) is True
    client.explain(breast_png(256, 192, seed=0))  # the same (only) worker, directly
    freed_s = time.perf_counter() - t_cancel
    t.join(60)
    err = out.get("err")
    assert isinstance(err, ServeError) and err.status == 409 and err.type == "Cancelled", out
    row = alice.job(job)
    print(f"\nremote cancel through the proxy -> job answered 409 in {out['t'] - t_cancel:.2f} s, /predictions "
          f"by the same worker {freed_s:.2f} s after the cancel; stopped after {row['done']} of {row['total']} steps")
    assert row["state"] == "cancelled" and freed_s < 4.0, (row, freed_s)
    assert alice.cancel(job) is False
    # a request may name only its own user's job: bob naming alice's, or an id nobody made, is refused
    # before any work (404, as /api/jobs answers), and neither row is written
    stranger = new_id()
    for named in (job, stranger):
        files = {"data": ("image", breast_png(256, 192, seed=0), "application/octet-stream"),
                 "options": (None, json.dumps({"job": named}), "application/json")}
        r = requests.post(f"{lab.url}/api/explanations/{MODEL}", files=files, auth=("bob", PASSWORDS["bob"]),
                          verify=False, timeout=60)
        assert r.status_code == 404 and r.json()["type"] == "JobNotFound", r.text
    assert client.job(job)["state"] == "cancelled" and client.job(job)["owner"] == "alice"
    assert client.job(stranger) is None
    # alice naming her own job still works (the row is hers; cancelled, it answers 409)
    files = {"data": ("image", breast_png(256, 192, seed=0), "application/octet-stream"),
             "options": (None, json.dumps({"job": job}), "application/json")}
    r = requests.post(f"{lab.url}/api/explanations/{MODEL}", files=files, auth=("alice", PASSWORDS["alice"]),
                      verify=False, timeout=60)
    assert r.status_code == 409 and r.json()["type"] == "Cancelled", r.text


_REMOTE_CLIENT = """
import sys
from deepminer.client import Client
from deepminer.options import ExplainOptions
sys.path.insert(0, {tests!r})
from modelfixtures import breast_png
c = Client({url!r}, model={model!r}, timeout=300)
c.session.auth, c.session.verify, c.session.trust_env = ("alice", {password!r}), False, False
c.explain_methods(breast_png(2048, 1536, seed=8), {methods!r}, job={job!r}, options=ExplainOptions.build(max_side=2048))
print("finished")
"""


def test_a_killed_remote_client_frees_the_worker(lab, client, tmp_path):
    job = new_id()
    script = tmp_path / "remote_client.py"
    script.write_text(_REMOTE_CLIENT.format(tests=os.path.dirname(__file__), url=lab.url + "/api", model=MODEL,
                                            password=PASSWORDS["alice"], methods=HEAVY, job=job))
    env = {k: v for k, v in os.environ.items() if k != "DEEPMINER_JOBS"}
    proc = subprocess.Popen([sys.executable, str(script)], env={**env, "PYTHONPATH": str(ROOT)},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        _wait_for(lambda: (client.job(job) or {}).get("done", 0) >= 2, 120)
        beat = client.job(job)["heartbeat"]
        _wait_for(lambda: client.job(job)["heartbeat"] > beat, 10)  # heartbeats arrive through the proxy
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    assert client.job(job)["owner"] == "alice"
    _assert_freed_after_kill(client, job, "remote client")


def _assert_freed_after_kill(client, job: str, who: str) -> None:
    """After ``who``'s process was killed mid-job: the job stops soon after the heartbeat limit, long before
    its last step (the limit is checked between steps, and a heavy step on a busy 2-core machine took 6 s:
    15 s of slack), and the worker then answers a prediction fast."""
    t_kill = time.perf_counter()
    row = _wait_for(lambda: (r := client.job(job)) and r["state"] != "running" and r, HEARTBEAT_S + 30)
    gone_s = time.perf_counter() - t_kill
    t0 = time.perf_counter()
    client.explain(breast_png(256, 192, seed=0))
    predict_s = time.perf_counter() - t0
    print(f"\n{who} killed -> job stopped in {gone_s:.2f} s (heartbeat limit {HEARTBEAT_S} s), then /predictions in "
          f"{predict_s * 1000:.0f} ms; stopped after {row['done']} of {row['total']} steps: {row['message']}")
    assert row["state"] == "cancelled" and "stopped waiting" in row["message"], row
    assert row["done"] < row["total"] and gone_s < HEARTBEAT_S + 15, (gone_s, row)
    assert predict_s < 2.0, predict_s
