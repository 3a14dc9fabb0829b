"""The lab's jobs API for remote clients (serve/auth.py ``/api/jobs``, :func:`serve.auth.jobs_api`) on
the real sign-in service over loopback HTTP and a real job file, and :class:`deepminer.client.Client`'s
remote path (:class:`deepminer.client.RemoteJobs`) against it. The worker is played by
:class:`deepminer.jobs.Tracker` on the same file (what the handler does between steps). Through nginx
and a real TorchServe: tests/test_serve_jobs.py (the ``remote`` tests)."""
from __future__ import annotations

import threading
import time

import pytest
import requests

from deepminer.client import Client, RemoteJobs, ServeError
from deepminer.jobs import JobCancelled, JobStore, new_id

PASSWORDS = {"alice": "alice password 1", "bob": "bobs password 22"}


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    from deepminer.commands import users as users_cmd
    from serve.auth import AuthServer

    work = tmp_path_factory.mktemp("jobs-api")
    users_cmd.write_users(work / "users", {n: users_cmd.hash_password(p, rounds=4) for n, p in PASSWORDS.items()})
    srv = AuthServer(work / "users", work / "session.key", jobs=work / "jobs.sqlite").start()
    yield {"url": f"http://127.0.0.1:{srv.port}", "store": JobStore(work / "jobs.sqlite")}
    srv.stop()


def _as(name: str | None) -> requests.Session:
    s = requests.Session()
    s.trust_env = False
    if name:
        s.auth = (name, PASSWORDS[name])
    return s


def test_create_read_heartbeat_cancel_and_only_the_owner(service):
    url, store = service["url"] + "/api/jobs", service["store"]
    alice, bob = _as("alice"), _as("bob")
    r = alice.post(url, json={})
    assert r.status_code == 201 and r.json()["state"] == "queued" and r.json()["owner"] == "alice"
    job = r.json()["id"]
    # a client-chosen id is taken once; a bad id is one line
    mine = new_id()
    assert alice.post(url, json={"id": mine, "group": "g1"}).status_code == 201
    taken = bob.post(url, json={"id": mine})
    assert taken.status_code == 409 and taken.json()["type"] == "JobExists"
    bad = alice.post(url, json={"id": "no good!"})
    assert bad.status_code == 400 and "8-64" in bad.json()["message"]
    # the worker runs it; its owner sees the progress
    tracker = store.tracker(job, heartbeat_s=60)
    tracker.begin(5, "integrated_gradients")
    tracker.step()
    row = alice.get(f"{url}/{job}").json()
    assert (row["state"], row["done"], row["total"], row["step"]) == ("running", 1, 5, "integrated_gradients")
    assert {j["id"] for j in alice.get(url).json()["jobs"]} == {job, mine}
    # heartbeat: the row's heartbeat moves
    before = store.get(job)["heartbeat"]
    time.sleep(0.05)
    assert alice.post(f"{url}/{job}/heartbeat").json() == {"id": job, "state": "running"}
    assert store.get(job)["heartbeat"] > before
    # another user: as if there were no such job (read, heartbeat, cancel, list, group cancel)
    for method, path in (("GET", f"/{job}"), ("POST", f"/{job}/heartbeat"), ("DELETE", f"/{job}")):
        r = bob.request(method, url + path)
        assert r.status_code == 404 and r.json()["type"] == "JobNotFound", (method, path, r.text)
    assert bob.get(url).json() == {"jobs": []}
    assert bob.delete(url, params={"group": "g1"}).json() == {"cancelled": 0}
    assert store.get(job)["cancel"] == 0
    # nobody signed in, or a wrong password: 401 (JSON, one line)
    wrong = _as(None)
    wrong.auth = ("alice", "not the password")
    for s in (_as(None), wrong):
        for method, path in (("GET", ""), ("POST", ""), ("GET", f"/{job}"), ("DELETE", f"/{job}")):
            r = s.request(method, url + path)
            assert r.status_code == 401 and r.json()["type"] == "Unauthorized", (method, path)
    # the owner cancels: the worker stops at its next step; a second cancel is 409
    r = alice.delete(f"{url}/{job}")
    assert r.status_code == 200 and r.json()["cancel"] == 1 and "alice" in r.json()["reason"]
    with pytest.raises(JobCancelled):
        tracker.step()
    tracker.finish("cancelled", "stopped")
    again = alice.delete(f"{url}/{job}")
    assert again.status_code == 409 and again.json()["type"] == "JobFinished"
    assert alice.delete(f"{url}/{new_id()}").status_code == 404
    assert alice.delete(url, params={"group": "g1"}).json() == {"cancelled": 1}
    # a job the host's own clients wrote (no owner) is nobody's through the API
    local = new_id()
    store.create(local)
    assert alice.get(f"{url}/{local}").status_code == 404


def test_the_client_uses_the_api_when_it_has_no_job_file(service, monkeypatch):
    """explain_methods creates the job through the API, heartbeats it while it waits, and the owner's
    cancel (Client.cancel) reaches the worker; a call left by Ctrl-C cancels its job."""
    store = service["store"]
    client = Client(service["url"] + "/api", model="tiny", timeout=30)
    client.session.auth = ("alice", PASSWORDS["alice"])
    client.session.trust_env = False
    assert client.jobs is None and isinstance(client.job_store, RemoteJobs)
    seen: dict = {}

    def worker(image, options, explanations=False, heavy=False):  # what the handler does with the job
        job = options["job"]
        seen["job"] = job
        tracker = store.tracker(job, heartbeat_s=60)
        tracker.begin(100, "smoothgrad")
        beats = [store.get(job)["heartbeat"]]
        try:
            for _ in range(100):
                time.sleep(0.1)
                tracker.step()
                beats.append(store.get(job)["heartbeat"])
                seen["beats"] = beats
        except JobCancelled as err:
            tracker.finish("cancelled", str(err))
            raise ServeError(409, "Cancelled", str(err)) from None
        return {}

    monkeypatch.setattr(client, "explain_raw", worker)
    out: dict = {}

    def go() -> None:
        try:
            client.explain_methods(b"image", ["smoothgrad"])
        except ServeError as err:
            out["err"] = err

    t = threading.Thread(target=go, daemon=True)
    t.start()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and len(set(seen.get("beats", []))) < 2:
        time.sleep(0.1)
    assert len(set(seen["beats"])) >= 2, seen  # touched through the API while it waited (every 2 s)
    job = seen["job"]
    row = client.job(job)
    assert row["state"] == "running" and row["done"] >= 1 and row["owner"] == "alice"
    assert client.cancel(job) is True
    t.join(10)
    assert getattr(out.get("err"), "status", None) == 409, out
    assert client.job(job)["state"] == "cancelled" and client.cancel(job) is False

    def interrupted(image, options, explanations=False, heavy=False):
        seen["job"] = options["job"]
        raise KeyboardInterrupt

    monkeypatch.setattr(client, "explain_raw", interrupted)
    with pytest.raises(KeyboardInterrupt):
        client.explain_methods(b"image", ["smoothgrad"])
    assert store.get(seen["job"])["cancel"] == 1 and "alice" in store.get(seen["job"])["reason"]
    # another user's client sees none of it
    other = Client(service["url"] + "/api", model="tiny")
    other.session.auth = ("bob", PASSWORDS["bob"])
    other.session.trust_env = False
    assert other.job(job) is None and other.cancel(seen["job"]) is False


def test_a_server_without_the_api_is_asked_once(service):
    """A client of a server without ``/jobs`` (TorchServe itself, on another port) runs plain calls."""
    client = Client(service["url"] + "/nothing", model="tiny", timeout=5)
    client.session.trust_env = False
    assert client.job_store is None and client._remote is False
    assert client.job(new_id()) is None and client.cancel(new_id()) is False
