"""The label store on a real SQLite file: transactions, history, concurrency, crashes, import/export."""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from deepminer.errors import InputError
from deepminer.labels import LabelStore, default_url, unit_agreement

M, H = "demo", "0123abcd"


@pytest.fixture
def db(tmp_path) -> str:
    return f"sqlite:///{tmp_path / 'sub' / 'labels.db'}"


def test_set_labels_history_and_latest_wins(db):
    store = LabelStore(db)
    recs = store.set_labels(M, H, [3, 1, 3], "spiculated mass", "alice", recognizable=True, confidence=4,
                            birads_category="Mass margin", cancer_association="malignant")
    assert [r.unit for r in recs] == [1, 3] and len({r.batch for r in recs}) == 1
    time.sleep(0.002)
    store.set_labels(M, H, [3], "calcification", "bob")
    assert store.labels_for(M, H) == {1: "spiculated mass", 3: "calcification"}
    assert store.labels_for(M, H, annotator="alice") == {1: "spiculated mass", 3: "spiculated mass"}
    # a different weights hash is a different model: nothing leaks across
    assert store.labels_for(M, "other") == {}
    hist = store.history(M, H, unit=3)
    assert [(r.annotator, r.label) for r in hist] == [("alice", "spiculated mass"), ("bob", "calcification")]
    assert hist[0].confidence == 4 and hist[0].recognizable is True and hist[0].created_at.tzinfo is not None
    # bob withdraws: the unit falls back to alice's current label; history keeps all three events
    store.clear_labels(M, H, [3], "bob")
    assert store.labels_for(M, H)[3] == "spiculated mass"
    assert len(store.history(M, H, unit=3)) == 3
    assert store.vocabulary() == ["calcification", "spiculated mass"]
    assert store.models() == [(M, H)]
    assert Path(db.removeprefix("sqlite:///")).is_file()
    # WAL is on for the file store
    con = sqlite3.connect(db.removeprefix("sqlite:///"))
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_bad_input_is_one_line_and_writes_nothing(db):
    store = LabelStore(db)
    for kwargs, needle in [
        (dict(units=[], label="x", annotator="a"), "no units"),
        (dict(units=[-1], label="x", annotator="a"), "unit"),
        (dict(units=["x"], label="x", annotator="a"), "unit"),
        (dict(units=[1], label="x", annotator="  "), "annotator is empty"),
        (dict(units=[1], label="x" * 201, annotator="a"), "longer than 200"),
        (dict(units=[1], label="a\nb", annotator="a"), "control characters"),
        (dict(units=[1], label="x", annotator="a", confidence=9), "confidence"),
        (dict(units=[1], label="x", annotator="a", cancer_association="maybe"), "cancer_association"),
        (dict(units=[1], label="x", annotator="a", colour="red"), "unknown survey field"),
    ]:
        with pytest.raises(InputError, match=needle) as info:
            store.set_labels(M, H, **kwargs)
        assert "\n" not in str(info.value)
    assert store.history() == []


def test_html_in_a_label_round_trips_as_text(db, tmp_path):
    store = LabelStore(db)
    evil = '<img src=x onerror="alert(1)"> & <b>mass</b> "quoted", comma'
    store.set_labels(M, H, [7], evil, "<script>eve</script>", description="line 1\nline 2 <i>x</i>")
    assert store.labels_for(M, H) == {7: evil}
    other = LabelStore(f"sqlite:///{tmp_path / 'copy.db'}")
    assert other.import_csv(store.export_csv().encode()) == 1
    assert other.labels_for(M, H) == {7: evil}
    assert other.history()[0].annotator == "<script>eve</script>"
    assert other.history()[0].description == "line 1\nline 2 <i>x</i>"
    third = LabelStore(f"sqlite:///{tmp_path / 'copy2.db'}")
    assert third.import_json(store.export_json()) == 1
    assert third.history() == store.history()


def test_export_import_round_trip_is_idempotent_and_all_or_nothing(db, tmp_path):
    store = LabelStore(db)
    store.set_labels(M, H, [1, 2], "mass", "alice", confidence=3, recognizable=False)
    store.set_labels(M, H, [2], "calcification", "bob")
    csv_text, json_text = store.export_csv(), store.export_json()
    assert json.loads(json_text)["events"][0]["unit"] == 1
    target = LabelStore(f"sqlite:///{tmp_path / 't.db'}")
    assert target.import_csv(csv_text) == 3
    assert target.import_csv(csv_text) == 0          # same uids: nothing new
    assert target.import_json(json_text) == 0
    assert target.history() == store.history()
    assert target.labels_for(M, H) == store.labels_for(M, H)

    # row 4 is bad: the error names it and no row of the file is imported
    lines = csv_text.splitlines()
    header, rows = lines[0], lines[1:]
    fresh = [r.replace(r.split(",")[0], f"new{i}", 1) for i, r in enumerate(rows)]
    bad = fresh[:2] + [fresh[2].replace(",2,", ",two,", 1)]
    empty = LabelStore(f"sqlite:///{tmp_path / 'e.db'}")
    with pytest.raises(InputError, match=r"labels.csv:4: unit 'two'"):
        empty.import_csv("\n".join([header] + bad))
    assert empty.history() == []
    with pytest.raises(InputError, match="missing columns annotator"):
        empty.import_csv("model,weights_hash,unit,label\nm,h,1,x\n")
    with pytest.raises(InputError, match="event 2: annotator is empty"):
        empty.import_json(json.dumps([{"model": M, "weights_hash": H, "unit": 1, "label": "a", "annotator": "x"},
                                      {"model": M, "weights_hash": H, "unit": 2, "label": "b"}]))
    with pytest.raises(InputError, match="not a JSON file"):
        empty.import_json(b"\xff\xfe{")
    with pytest.raises(InputError, match="not a UTF-8 CSV"):
        empty.import_csv(b"\xff\xfe\x00a")
    assert empty.history() == []


def test_agreement_between_annotators(db):
    store = LabelStore(db)
    store.set_labels(M, H, [1, 2], "Spiculated  mass", "alice")
    store.set_labels(M, H, [1], "spiculated mass", "bob")
    store.set_labels(M, H, [2], "calcification", "bob")
    store.set_labels(M, H, [2], "calcification", "carol")
    agr = store.agreement(M, H)
    assert agr[1].share == 1.0 and agr[1].pairwise == 1.0 and agr[1].annotators == 2
    assert agr[2].majority == "calcification" and agr[2].share == pytest.approx(2 / 3)
    assert agr[2].pairwise == pytest.approx(1 / 3)  # pairs: a-b no, a-c no, b-c yes
    assert unit_agreement(5, {"x": "a"}).pairwise is None


def _writer(url: str, annotator: str, n: int) -> None:
    store = LabelStore(url)
    for i in range(n):
        store.set_labels(M, H, [i], f"label {annotator} {i}", annotator)
    store.close()


def test_concurrent_processes_lose_no_write(db):
    LabelStore(db).close()  # create the schema first (both writers would race to do it otherwise)
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_writer, args=(db, name, 200)) for name in ("p1", "p2")]
    t0 = time.perf_counter()
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    elapsed = time.perf_counter() - t0
    store = LabelStore(db)
    hist = store.history(M, H)
    assert len(hist) == 400, f"lost {400 - len(hist)} writes"
    assert {r.annotator for r in hist} == {"p1", "p2"}
    assert len(store.agreement(M, H)) == 200
    print(f"2 x 200 concurrent label writes: {elapsed:.2f} s")


CRASHER = textwrap.dedent("""
    import sys, time, uuid
    from datetime import datetime, timezone
    from pathlib import Path
    from sqlalchemy.orm import Session
    from deepminer.labels import LabelStore, LabelEvent
    store = LabelStore(sys.argv[1])
    with Session(store.engine) as s, s.begin():
        s.connection().exec_driver_sql("PRAGMA cache_size = 2")  # spill dirty pages to the WAL
        now = datetime.now(timezone.utc)
        s.add_all(LabelEvent(uid=uuid.uuid4().hex, model="demo", weights_hash="0123abcd", unit=u,
                             label="half-written", annotator="crash", created_at=now, batch="b",
                             description="x" * 3000) for u in range(2000))
        s.flush()
        Path(sys.argv[2]).touch()
        time.sleep(120)
""")


def test_process_killed_mid_transaction_leaves_previous_state(db, tmp_path):
    store = LabelStore(db)
    store.set_labels(M, H, [1, 2], "mass", "alice")
    before = store.history()
    store.close()
    ready = tmp_path / "ready"
    path = db.removeprefix("sqlite:///")
    proc = subprocess.Popen([sys.executable, "-c", CRASHER, db, str(ready)], cwd=Path(__file__).parents[1])
    try:
        deadline = time.time() + 60
        while not ready.exists():
            assert proc.poll() is None, "crasher exited early"
            assert time.time() < deadline
            time.sleep(0.05)
        wal = Path(path + "-wal")
        assert wal.stat().st_size > 1_000_000, "the uncommitted transaction never reached the WAL"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(30)
    assert proc.returncode == -signal.SIGKILL
    after = LabelStore(db)
    assert after.history() == before
    assert after.labels_for(M, H) == {1: "mass", 2: "mass"}
    after.set_labels(M, H, [3], "calcification", "bob")  # and it is writable again
    assert len(after.history()) == 3
    con = sqlite3.connect(path)
    assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def test_default_url_setting(monkeypatch):
    monkeypatch.delenv("DEEPMINER_LABELS_URL", raising=False)
    assert default_url() == "sqlite:///var/labels.db"
    monkeypatch.setenv("DEEPMINER_LABELS_URL", "sqlite:////tmp/x.db")
    assert default_url() == "sqlite:////tmp/x.db"
    with pytest.raises(InputError, match="not a database URL"):
        LabelStore("not a url")
