"""The label store: who said which unit of which model detects what.

One append-only table of label *events* is the truth; every "current" answer is a query over it
(the latest event per unit and annotator), so history can never disagree with the present and a
write is a single ``INSERT`` batch in one transaction.

* Keys: model name + weights hash + unit index. A label outlives a model rebuild only when the
  weights are identical.
* Default backend: a SQLite file (``var/labels.db``; setting ``DEEPMINER_LABELS_URL`` takes any
  SQLAlchemy URL, e.g. ``postgresql+psycopg://...``). SQLite runs in WAL mode with a busy timeout
  and ``BEGIN IMMEDIATE`` write transactions, so concurrent sessions queue instead of failing or
  losing a write, and a crash mid-transaction leaves the previous committed state.
* Several annotators: :meth:`LabelStore.labels_for` resolves a unit to the most recent label by
  anyone (or by one annotator when asked); :meth:`LabelStore.agreement` compares the annotators'
  own current labels per unit.
* A label is plain text, stored and returned verbatim (HTML stays text; rendering is the UI's job).
* Export/import as CSV or JSON carry the whole history; import validates every row first and
  writes all rows in one transaction (nothing partially imported); re-importing is a no-op
  (events are deduplicated by ``uid``).
"""
from __future__ import annotations

import csv
import io
import json
import os
import uuid
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from itertools import combinations
from pathlib import Path
from typing import Any

from sqlalchemy import (Boolean, DateTime, Index, Integer, String, Text, create_engine, event, func,
                        select)
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from deepminer.errors import InputError

DEFAULT_URL = "sqlite:///var/labels.db"
URL_SETTING = "DEEPMINER_LABELS_URL"
MAX_LABEL = 200
MAX_TEXT = 4000
ASSOCIATIONS = ("", "malignant", "benign", "normal", "not associated", "unsure")
#: Columns of the CSV export (also the keys of each JSON event), in order.
EXPORT_FIELDS = ("uid", "model", "weights_hash", "unit", "label", "annotator", "created_at",
                 "recognizable", "description", "birads_category", "cancer_association", "confidence",
                 "batch", "source")
SURVEY_FIELDS = ("recognizable", "description", "birads_category", "cancer_association", "confidence")


class _Base(DeclarativeBase):
    pass


class LabelEvent(_Base):
    """One label given (or cleared, ``label == ""``) by one annotator to one unit. Never updated."""

    __tablename__ = "label_events"
    __table_args__ = (Index("ix_label_events_key", "model", "weights_hash", "unit", "annotator"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    uid: Mapped[str] = mapped_column(String(36), unique=True, nullable=False)
    model: Mapped[str] = mapped_column(String(200), nullable=False)
    weights_hash: Mapped[str] = mapped_column(String(128), nullable=False)
    unit: Mapped[int] = mapped_column(Integer, nullable=False)
    label: Mapped[str] = mapped_column(String(MAX_LABEL), nullable=False, default="")
    annotator: Mapped[str] = mapped_column(String(100), nullable=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    batch: Mapped[str] = mapped_column(String(36), nullable=False)
    source: Mapped[str] = mapped_column(String(20), nullable=False, default="ui")
    recognizable: Mapped[bool | None] = mapped_column(Boolean, nullable=True)
    description: Mapped[str] = mapped_column(Text, nullable=False, default="")
    birads_category: Mapped[str] = mapped_column(String(MAX_LABEL), nullable=False, default="")
    cancer_association: Mapped[str] = mapped_column(String(50), nullable=False, default="")
    confidence: Mapped[int | None] = mapped_column(Integer, nullable=True)


@dataclass(frozen=True)
class LabelRecord:
    """A label event as the UI and exports see it (``created_at`` is timezone-aware UTC)."""

    uid: str
    model: str
    weights_hash: str
    unit: int
    label: str
    annotator: str
    created_at: datetime
    recognizable: bool | None = None
    description: str = ""
    birads_category: str = ""
    cancer_association: str = ""
    confidence: int | None = None
    batch: str = ""
    source: str = "ui"

    def as_dict(self) -> dict:
        """JSON-ready dict with keys :data:`EXPORT_FIELDS`."""
        d = {k: getattr(self, k) for k in EXPORT_FIELDS}
        d["created_at"] = self.created_at.isoformat()
        return d


@dataclass(frozen=True)
class UnitAgreement:
    """How the annotators of one unit agree. Labels compare case- and whitespace-insensitively.

    ``share``: fraction of annotators giving the majority label; ``pairwise``: fraction of annotator
    pairs giving the same label (``None`` with fewer than two annotators)."""

    unit: int
    labels: dict[str, str] = field(default_factory=dict)  # annotator -> label
    majority: str = ""
    share: float = 0.0
    pairwise: float | None = None

    @property
    def annotators(self) -> int:
        return len(self.labels)


def normalize_label(label: str) -> str:
    """The comparison form of a label (case-folded, single spaces); display keeps the original."""
    return " ".join(str(label).split()).casefold()


def default_url() -> str:
    """The store URL: ``$DEEPMINER_LABELS_URL`` or ``sqlite:///var/labels.db``."""
    return os.environ.get(URL_SETTING) or DEFAULT_URL


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _utc(dt: datetime) -> datetime:
    return dt.replace(tzinfo=timezone.utc) if dt.tzinfo is None else dt.astimezone(timezone.utc)


# ---------------------------------------------------------------------------------------------
# validation (one place; used by set_labels and by both importers)

def _text(value: Any, name: str, *, limit: int, required: bool = False, single_line: bool = True) -> str:
    text = "" if value is None else str(value)
    text = text.strip()
    if required and not text:
        raise InputError(f"{name} is empty")
    if len(text) > limit:
        raise InputError(f"{name} is longer than {limit} characters")
    bad = [c for c in text if ord(c) < 32 and (single_line or c not in "\n\t")]
    if bad:
        raise InputError(f"{name} contains control characters")
    return text


def _parse_unit_index(value: Any, name: str = "unit") -> int:
    """A unit index (a non-negative int) from an int or its text (CSV, JSON, form input)."""
    if isinstance(value, bool):
        raise InputError(f"{name} {value!r} is not a unit index")
    try:
        unit = int(str(value).strip()) if not isinstance(value, int) else value
    except ValueError:
        raise InputError(f"{name} {value!r} is not a unit index (a non-negative integer)") from None
    if unit < 0:
        raise InputError(f"{name} {value!r} is not a unit index (a non-negative integer)")
    return unit


def _bool(value: Any, name: str) -> bool | None:
    if value is None or isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("", "none", "null"):
        return None
    if text in ("true", "yes", "1", "y"):
        return True
    if text in ("false", "no", "0", "n"):
        return False
    raise InputError(f"{name} {value!r} is not yes/no")


def _confidence(value: Any) -> int | None:
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    try:
        conf = int(str(value).strip())
    except ValueError:
        raise InputError(f"confidence {value!r} is not an integer 1-5") from None
    if not 1 <= conf <= 5:
        raise InputError(f"confidence {value!r} is not an integer 1-5")
    return conf


def _survey(recognizable: Any = None, description: Any = "", birads_category: Any = "",
            cancer_association: Any = "", confidence: Any = None) -> dict:
    assoc = _text(cancer_association, "cancer_association", limit=50).lower()
    if assoc not in ASSOCIATIONS:
        raise InputError(f"cancer_association {assoc!r} not in {', '.join(a for a in ASSOCIATIONS if a)}")
    return {
        "recognizable": _bool(recognizable, "recognizable"),
        "description": _text(description, "description", limit=MAX_TEXT, single_line=False),
        "birads_category": _text(birads_category, "birads_category", limit=MAX_LABEL),
        "cancer_association": assoc,
        "confidence": _confidence(confidence),
    }


def _key(model: Any, weights_hash: Any) -> tuple[str, str]:
    return (_text(model, "model", limit=200, required=True),
            _text(weights_hash, "weights_hash", limit=128, required=True))


# ---------------------------------------------------------------------------------------------

def _sqlite_engine(url: str) -> Engine:
    u = make_url(url)
    db = u.database
    if db and db != ":memory:" and not db.startswith("file:"):
        Path(db).expanduser().parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(u, connect_args={"timeout": 30, "check_same_thread": False})

    @event.listens_for(engine, "connect")
    def _connect(dbapi_conn, _record) -> None:  # pragma: no cover - exercised by every test
        dbapi_conn.isolation_level = None  # we issue BEGIN ourselves
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA busy_timeout = 30000")
        if db and db != ":memory:":
            cur.execute("PRAGMA journal_mode = WAL")
        cur.execute("PRAGMA synchronous = FULL")
        cur.close()

    @event.listens_for(engine, "begin")
    def _begin(conn) -> None:  # pragma: no cover
        # writers take the write lock up front, so two of them queue on busy_timeout instead of
        # failing on a lock upgrade; readers take a plain snapshot (WAL: they never wait)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get("write_lock") else "BEGIN")

    return engine


class LabelStore:
    """Unit labels for one or many models, in any SQLAlchemy database (SQLite file by default)."""

    def __init__(self, url: str | None = None):
        self.url = url or default_url()
        try:
            backend = make_url(self.url).get_backend_name()
        except Exception as err:  # noqa: BLE001 - a malformed URL raises ArgumentError, a bad port ValueError
            raise InputError(f"{URL_SETTING}: not a database URL: {self.url!r} ({err})") from None
        self.engine = _sqlite_engine(self.url) if backend == "sqlite" else create_engine(self.url, pool_pre_ping=True)
        self._writer = self.engine.execution_options(write_lock=True)
        _Base.metadata.create_all(self._writer)

    def __repr__(self) -> str:
        return f"LabelStore({self.engine.url.render_as_string(hide_password=True)!r})"

    def close(self) -> None:
        self.engine.dispose()

    # -- writing ---------------------------------------------------------------------------------

    def set_labels(self, model: str, weights_hash: str, units: Iterable[int], label: str, annotator: str,
                   *, source: str = "ui", **survey: Any) -> list[LabelRecord]:
        """Give ``label`` to every unit in ``units`` as ``annotator``, in ONE transaction.

        ``label == ""`` clears this annotator's label (allowed with a survey saying the unit shows no
        recognizable phenomenon). ``survey`` takes :data:`SURVEY_FIELDS`. Returns the new records.
        Raises :class:`InputError` (one line) on bad input; nothing is written then."""
        unknown = sorted(set(survey) - set(SURVEY_FIELDS))
        if unknown:
            raise InputError(f"unknown survey field(s): {', '.join(unknown)}")
        model, weights_hash = _key(model, weights_hash)
        unit_list = sorted({_parse_unit_index(u) for u in units})
        if not unit_list:
            raise InputError("no units selected")
        label = _text(label, "label", limit=MAX_LABEL)
        annotator = _text(annotator, "annotator", limit=100, required=True)
        fields = _survey(**survey)
        now, batch = _now(), uuid.uuid4().hex
        rows = [LabelRecord(uid=uuid.uuid4().hex, model=model, weights_hash=weights_hash, unit=u, label=label,
                            annotator=annotator, created_at=now, batch=batch, source=source, **fields)
                for u in unit_list]
        self._insert(rows)
        return rows

    def clear_labels(self, model: str, weights_hash: str, units: Iterable[int], annotator: str) -> list[LabelRecord]:
        """Withdraw ``annotator``'s labels of ``units`` (an event too: history keeps the old label)."""
        return self.set_labels(model, weights_hash, units, "", annotator)

    def _insert(self, records: Sequence[LabelRecord]) -> int:
        """Insert records whose ``uid`` is new, all in one transaction; returns how many were new."""
        with Session(self._writer) as session, session.begin():
            uids = [r.uid for r in records]
            known: set[str] = set()
            for i in range(0, len(uids), 500):
                known |= set(session.scalars(select(LabelEvent.uid).where(LabelEvent.uid.in_(uids[i:i + 500]))))
            fresh = []
            for r in records:
                if r.uid not in known:
                    known.add(r.uid)
                    fresh.append(r)
            session.add_all(LabelEvent(**{k: getattr(r, k) for k in EXPORT_FIELDS}) for r in fresh)
        return len(fresh)

    # -- reading ---------------------------------------------------------------------------------

    def _current(self, model: str, weights_hash: str, annotator: str | None = None) -> list[LabelEvent]:
        """Latest event per (unit, annotator), cleared ones included, newest first."""
        ranked = (select(LabelEvent.id, func.row_number().over(
            partition_by=(LabelEvent.unit, LabelEvent.annotator),
            order_by=(LabelEvent.created_at.desc(), LabelEvent.id.desc())).label("rn"))
            .where(LabelEvent.model == model, LabelEvent.weights_hash == weights_hash))
        if annotator is not None:
            ranked = ranked.where(LabelEvent.annotator == annotator)
        sub = ranked.subquery()
        stmt = (select(LabelEvent).join(sub, sub.c.id == LabelEvent.id).where(sub.c.rn == 1)
                .order_by(LabelEvent.created_at.desc(), LabelEvent.id.desc()))
        with Session(self.engine) as session:
            rows = list(session.scalars(stmt))
            session.expunge_all()
        return rows

    def current(self, model: str, weights_hash: str, annotator: str | None = None) -> list[LabelRecord]:
        """Each annotator's current record per unit (cleared labels left out), newest first."""
        return [_record(e) for e in self._current(model, weights_hash, annotator) if e.label]

    def labels_for(self, model: str, weights_hash: str, annotator: str | None = None) -> dict[int, str]:
        """``{unit: label}``: per unit the most recent current label by any annotator (or by
        ``annotator``). A unit whose newest event clears the label falls back to the other
        annotators' current labels; disagreement is reported by :meth:`agreement`, not here."""
        out: dict[int, str] = {}
        for e in self._current(model, weights_hash, annotator):  # newest first
            if e.label and e.unit not in out:
                out[e.unit] = e.label
        return dict(sorted(out.items()))

    def surveyed_units(self, model: str, weights_hash: str) -> set[int]:
        """Units with a current answer by anyone: a label, or a survey saying 'not recognizable'."""
        return {e.unit for e in self._current(model, weights_hash)
                if e.label or e.recognizable is not None}

    def history(self, model: str | None = None, weights_hash: str | None = None,
                unit: int | None = None) -> list[LabelRecord]:
        """Every event (oldest first), optionally for one model/weights/unit."""
        stmt = select(LabelEvent).order_by(LabelEvent.created_at, LabelEvent.id)
        if model is not None:
            stmt = stmt.where(LabelEvent.model == model)
        if weights_hash is not None:
            stmt = stmt.where(LabelEvent.weights_hash == weights_hash)
        if unit is not None:
            stmt = stmt.where(LabelEvent.unit == int(unit))
        with Session(self.engine) as session:
            return [_record(e) for e in session.scalars(stmt)]

    def models(self) -> list[tuple[str, str]]:
        """Every (model, weights_hash) that has events."""
        with Session(self.engine) as session:
            return [(model, weights_hash) for model, weights_hash in session.execute(
                select(LabelEvent.model, LabelEvent.weights_hash).distinct().order_by(LabelEvent.model))]

    def vocabulary(self, model: str | None = None) -> list[str]:
        """Distinct labels used so far (for the 'existing labels' part of a dropdown), sorted."""
        stmt = select(LabelEvent.label).where(LabelEvent.label != "").distinct()
        if model is not None:
            stmt = stmt.where(LabelEvent.model == model)
        with Session(self.engine) as session:
            return sorted(set(session.scalars(stmt)), key=str.casefold)

    def agreement(self, model: str, weights_hash: str) -> dict[int, UnitAgreement]:
        """Per unit with at least one current label: the annotators' labels and how they agree."""
        per_unit: dict[int, dict[str, str]] = {}
        for rec in self.current(model, weights_hash):
            per_unit.setdefault(rec.unit, {})[rec.annotator] = rec.label
        return {u: unit_agreement(u, labels) for u, labels in sorted(per_unit.items())}

    # -- export / import -------------------------------------------------------------------------

    def export_json(self, model: str | None = None, weights_hash: str | None = None) -> str:
        """The history as JSON: ``{"format": "deepminer-labels", "version": 1, "events": [...]}``."""
        events = [r.as_dict() for r in self.history(model, weights_hash)]
        return json.dumps({"format": "deepminer-labels", "version": 1, "events": events}, indent=1,
                          ensure_ascii=False)

    def export_csv(self, model: str | None = None, weights_hash: str | None = None) -> str:
        """The history as CSV with columns :data:`EXPORT_FIELDS` (UTF-8 text, LF line ends)."""
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=EXPORT_FIELDS, lineterminator="\n")
        w.writeheader()
        for r in self.history(model, weights_hash):
            d = r.as_dict()
            d["recognizable"] = "" if d["recognizable"] is None else ("yes" if d["recognizable"] else "no")
            d["confidence"] = "" if d["confidence"] is None else d["confidence"]
            w.writerow(d)
        return buf.getvalue()

    def import_json(self, data: str | bytes, name: str = "labels.json") -> int:
        """Import a JSON export (or a plain list of events). All or nothing; returns new events."""
        try:
            doc = json.loads(data.decode("utf-8") if isinstance(data, bytes) else data)
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise InputError(f"{name}: not a JSON file ({err})") from None
        events = doc.get("events") if isinstance(doc, dict) else doc
        if isinstance(doc, dict) and doc.get("format") not in (None, "deepminer-labels"):
            raise InputError(f"{name}: format {doc.get('format')!r} is not deepminer-labels")
        if not isinstance(events, list):
            raise InputError(f"{name}: expected a list of events (or {{\"events\": [...]}})")
        records = []
        for i, ev in enumerate(events, start=1):
            if not isinstance(ev, dict):
                raise InputError(f"{name}: event {i}: not an object")
            records.append(_parse_row(ev, f"{name}: event {i}"))
        return self._insert(records)

    def import_csv(self, data: str | bytes, name: str = "labels.csv") -> int:
        """Import a CSV export. Needs columns model, weights_hash, unit, label, annotator; the rest
        optional. All or nothing; returns the number of new events."""
        try:
            text = data.decode("utf-8-sig") if isinstance(data, bytes) else data
        except UnicodeDecodeError:
            raise InputError(f"{name}: not a UTF-8 CSV file") from None
        reader = csv.DictReader(io.StringIO(text))
        required = ("model", "weights_hash", "unit", "label", "annotator")
        missing = [c for c in required if c not in (reader.fieldnames or [])]
        if missing:
            raise InputError(f"{name}: missing columns {', '.join(missing)}")
        try:
            records = [_parse_row(row, f"{name}:{i}") for i, row in enumerate(reader, start=2)]
        except csv.Error as err:
            raise InputError(f"{name}: malformed CSV ({err})") from None
        return self._insert(records)


def unit_agreement(unit: int, labels: Mapping[str, str]) -> UnitAgreement:
    """Agreement of ``{annotator: label}`` for one unit (pure; see :class:`UnitAgreement`)."""
    norm = {a: normalize_label(lab) for a, lab in labels.items()}
    if not norm:
        return UnitAgreement(unit=unit)
    counts = Counter(norm.values())
    n = max(counts.values())
    # ties go to the label met first (callers pass annotators newest first)
    majority = next(labels[a] for a in labels if counts[norm[a]] == n)
    pairs = list(combinations(norm.values(), 2))
    pairwise = sum(a == b for a, b in pairs) / len(pairs) if pairs else None
    return UnitAgreement(unit=unit, labels=dict(labels), majority=majority, share=n / len(norm), pairwise=pairwise)


def _record(e: LabelEvent) -> LabelRecord:
    return LabelRecord(**{k: getattr(e, k) for k in EXPORT_FIELDS if k != "created_at"},
                       created_at=_utc(e.created_at))


def _parse_row(row: Mapping[str, Any], where: str) -> LabelRecord:
    """Validate one imported event; an :class:`InputError` names the row and the field."""
    try:
        model, weights_hash = _key(row.get("model"), row.get("weights_hash"))
        unit = _parse_unit_index(row.get("unit"))
        label = _text(row.get("label"), "label", limit=MAX_LABEL)
        annotator = _text(row.get("annotator"), "annotator", limit=100, required=True)
        fields = _survey(**{k: row.get(k) for k in SURVEY_FIELDS if row.get(k) is not None})
        created = row.get("created_at") or ""
        try:
            created_at = _utc(datetime.fromisoformat(str(created).strip())) if created else _now()
        except ValueError:
            raise InputError(f"created_at {created!r} is not an ISO 8601 time") from None
        uid = _text(row.get("uid"), "uid", limit=36) or uuid.uuid4().hex
        batch = _text(row.get("batch"), "batch", limit=36) or uid
    except InputError as err:
        raise InputError(f"{where}: {err}") from None
    return LabelRecord(uid=uid, model=model, weights_hash=weights_hash, unit=unit, label=label,
                       annotator=annotator, created_at=created_at, batch=batch,
                       source=_text(row.get("source"), "source", limit=20) or "import", **fields)
