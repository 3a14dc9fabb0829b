"""A PACS over DICOMweb (docs/serving.md, "A PACS"): search studies (QIDO-RS), retrieve instances
(WADO-RS), store results (STOW-RS), through one kept ``dicomweb-client`` session; and a local Orthanc
(Debian's ``orthanc`` + ``orthanc-dicomweb``) run as an unprivileged foreground process from a
generated configuration, for ``make run`` (``DEEPMINER_PACS=orthanc``) and the tests.

Every failure is a one-line :class:`PacsError` (``PacsUnavailable`` when nothing answers).

``python -m deepminer.pacs orthanc --root var/pacs --port 8042`` runs that Orthanc in the foreground
(the Procfile's ``pacs`` process).
"""
from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deepminer.errors import InputError

DEFAULT_PORT = 8042
PAGE_SIZE = 10
ORTHANC_BIN = "Orthanc"
DICOMWEB_PLUGIN_PATHS = ("/usr/share/orthanc/plugins/libOrthancDicomWeb.so",
                         "/usr/lib/orthanc/libOrthancDicomWeb.so")
MAMMOGRAM_SOP_CLASSES = {"1.2.840.10008.5.1.4.1.1.1.2", "1.2.840.10008.5.1.4.1.1.1.2.1",  # MG for presentation/processing
                         "1.2.840.10008.5.1.4.1.1.1.1", "1.2.840.10008.5.1.4.1.1.1.1.1",  # DX
                         "1.2.840.10008.5.1.4.1.1.7"}  # secondary capture (scanned film)


class PacsError(InputError):
    """The PACS refused or failed a request (one line)."""

    status = 502


class PacsUnavailable(PacsError):
    """Nothing answers at the PACS URL."""

    status = 503


def env_url() -> str | None:
    """The DICOMweb URL the workbench uses: ``$DEEPMINER_DICOMWEB_URL``, else the local Orthanc's when
    ``DEEPMINER_PACS=orthanc`` (port ``$DEEPMINER_PACS_PORT``, default 8042), else None."""
    url = os.environ.get("DEEPMINER_DICOMWEB_URL", "").strip()
    if url:
        return url.rstrip("/")
    if os.environ.get("DEEPMINER_PACS", "").strip().lower() == "orthanc":
        return f"http://127.0.0.1:{int(os.environ.get('DEEPMINER_PACS_PORT', DEFAULT_PORT))}/dicom-web"
    return None


# -- QIDO rows ------------------------------------------------------------------------------------

def _value(row: dict, tag: str, default: str = "") -> str:
    """The first value of ``tag`` (8 hex digits) in a DICOM JSON row, as text ("" when absent)."""
    vals = (row.get(tag) or {}).get("Value") or []
    if not vals:
        return default
    v = vals[0]
    if isinstance(v, dict):  # PN
        return str(v.get("Alphabetic", ""))
    return str(v)


def _values(row: dict, tag: str) -> list[str]:
    return [str(v) for v in (row.get(tag) or {}).get("Value") or []]


@dataclass(frozen=True)
class Study:
    uid: str
    patient_id: str
    patient_name: str
    accession: str
    date: str
    description: str
    modalities: tuple[str, ...]
    instances: int | None

    @classmethod
    def from_json(cls, row: dict) -> Study:
        n = _value(row, "00201208")
        return cls(uid=_value(row, "0020000D"), patient_id=_value(row, "00100020"),
                   patient_name=_value(row, "00100010"), accession=_value(row, "00080050"),
                   date=_value(row, "00080020"), description=_value(row, "00081030"),
                   modalities=tuple(_values(row, "00080061")), instances=int(n) if n.isdigit() else None)


@dataclass(frozen=True)
class Instance:
    study_uid: str
    series_uid: str
    sop_uid: str
    sop_class: str
    modality: str
    laterality: str | None
    view: str | None
    series_description: str

    @classmethod
    def from_json(cls, row: dict) -> Instance:
        lat = (_value(row, "00200062") or _value(row, "00200060")).upper()
        view = _value(row, "00185101").upper()
        return cls(study_uid=_value(row, "0020000D"), series_uid=_value(row, "0020000E"),
                   sop_uid=_value(row, "00080018"), sop_class=_value(row, "00080016"),
                   modality=_value(row, "00080060"), laterality=lat if lat in ("L", "R") else None,
                   view=view if view in ("CC", "MLO") else None, series_description=_value(row, "0008103E"))

    @property
    def is_mammogram(self) -> bool:
        """An image this model can explain: MG/DX modality or class (results we wrote are not)."""
        return self.modality in ("MG", "DX") or (self.sop_class in MAMMOGRAM_SOP_CLASSES and self.modality != "OT"
                                                 and not self.series_description.startswith("UNVERIFIED AI"))


@dataclass(frozen=True)
class Page:
    studies: list[Study]
    offset: int
    limit: int
    has_more: bool


STUDY_FIELDS = ("PatientID", "PatientName", "AccessionNumber", "StudyDate", "StudyDescription",
                "ModalitiesInStudy", "NumberOfStudyRelatedInstances")
INSTANCE_FIELDS = ("SOPClassUID", "Modality", "ImageLaterality", "Laterality", "ViewPosition",
                   "SeriesDescription", "SeriesInstanceUID", "StudyInstanceUID")


def _filter(value: str | None) -> str | None:
    """A search text as a QIDO filter: a substring match unless it has its own wildcards."""
    v = (value or "").strip()
    if not v:
        return None
    return v if any(c in v for c in "*?") else f"*{v}*"


def _session():
    """A requests Session that sends QIDO wildcards as typed: Orthanc 1.10 does not percent-decode
    ``%2A``/``%3F`` in query values, so ``PatientID=%2AP1%2A`` (what urlencode makes of ``*P1*``)
    matches nothing there, while ``*``/``?`` are legal in a query string (RFC 3986)."""
    import requests

    class _Session(requests.Session):
        def send(self, request, **kw):
            if request.method == "GET" and request.url and "?" in request.url:
                base, _, query = request.url.partition("?")
                request.url = base + "?" + query.replace("%2A", "*").replace("%3F", "?")
            return super().send(request, **kw)

    return _Session()


class Pacs:
    """A DICOMweb server at ``url`` (e.g. ``http://127.0.0.1:8042/dicom-web``), one kept session."""

    def __init__(self, url: str, *, timeout: float = 30.0, headers: dict[str, str] | None = None):
        from dicomweb_client.api import DICOMwebClient

        self.url = url.rstrip("/")
        self.session = _session()
        self.timeout = timeout
        self.client = DICOMwebClient(self.url, session=self.session, headers=headers, timeout=timeout)
        # one attempt: dicomweb-client's retrying also retries a refused connection (5 attempts with
        # exponential back-off, ~30 s before "the PACS is down" could be said); the page asks again
        self.client.set_http_retry_params(retry=False)

    def close(self) -> None:
        self.session.close()

    def __enter__(self) -> Pacs:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _call(self, what: str, fn, *args, **kw):
        import requests

        try:
            return fn(*args, **kw)
        except requests.exceptions.ConnectionError:
            raise PacsUnavailable(f"the PACS is not reachable at {self.url}") from None
        except requests.exceptions.Timeout:
            raise PacsUnavailable(f"the PACS at {self.url} did not answer within {self.timeout:.0f} s") from None
        except requests.exceptions.HTTPError as err:
            code = err.response.status_code if err.response is not None else "?"
            reason = err.response.reason if err.response is not None else str(err)
            raise PacsError(f"{what}: the PACS answered {code} {reason}") from None
        except (ValueError, OSError) as err:
            raise PacsError(f"{what}: {type(err).__name__}: {err}") from None

    # -- QIDO-RS ----------------------------------------------------------------------------------
    def search_studies(self, *, patient_id: str | None = None, accession: str | None = None,
                       limit: int = PAGE_SIZE, offset: int = 0) -> Page:
        """One page of studies (QIDO-RS), filtered by patient ID and/or accession number (substring
        matches; ``*``/``?`` wildcards as typed). ``has_more`` asks one row more than ``limit``."""
        if limit < 1 or offset < 0:
            raise InputError(f"search: limit {limit} must be >= 1 and offset {offset} >= 0")
        filters = {k: v for k, v in (("PatientID", _filter(patient_id)), ("AccessionNumber", _filter(accession)))
                   if v}
        rows = self._call("search studies", self.client.search_for_studies, limit=limit + 1, offset=offset,
                          fields=list(STUDY_FIELDS), search_filters=filters or None)
        studies = [Study.from_json(r) for r in rows]
        return Page(studies[:limit], offset, limit, len(studies) > limit)

    def instances(self, study_uid: str) -> list[Instance]:
        """Every instance of a study with its modality, laterality and view (QIDO-RS)."""
        rows = self._call("list the study's images", self.client.search_for_instances,
                          study_instance_uid=study_uid, fields=list(INSTANCE_FIELDS), get_remaining=True)
        return [Instance.from_json(r) for r in rows]

    # -- WADO-RS ----------------------------------------------------------------------------------
    def retrieve(self, inst: Instance):
        """The instance as a pydicom Dataset (WADO-RS, as stored: no transcoding)."""
        return self._call(f"retrieve {inst.sop_uid}", self.client.retrieve_instance, inst.study_uid,
                          inst.series_uid, inst.sop_uid, media_types=(("application/dicom", "*"),))

    def retrieve_bytes(self, inst: Instance) -> bytes:
        """The instance as a DICOM Part 10 file."""
        ds = self.retrieve(inst)
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        return buf.getvalue()

    # -- STOW-RS ----------------------------------------------------------------------------------
    def store(self, datasets: Sequence[Any], study_uid: str | None = None) -> list[str]:
        """Store datasets (STOW-RS); the SOP Instance UIDs the server accepted. A one-line error
        naming the refused ones otherwise."""
        if not datasets:
            return []
        resp = self._call("store", self.client.store_instances, list(datasets), study_instance_uid=study_uid)
        ok = [str(i.ReferencedSOPInstanceUID) for i in resp.get("ReferencedSOPSequence", [])]
        failed = [str(i.get("ReferencedSOPInstanceUID", "?")) for i in resp.get("FailedSOPSequence", [])]
        if failed:
            raise PacsError(f"store: the PACS refused {len(failed)} of {len(datasets)} object(s): {', '.join(failed)}")
        return ok

    def ping(self) -> bool:
        try:
            self.search_studies(limit=1)
            return True
        except PacsError:
            return False


# -- a local Orthanc --------------------------------------------------------------------------------

def dicomweb_plugin() -> str:
    """The DICOMweb plugin of the Debian package ``orthanc-dicomweb`` (one-line error if missing)."""
    for p in DICOMWEB_PLUGIN_PATHS:
        if Path(p).is_file():
            return p
    raise InputError("the Orthanc DICOMweb plugin is missing: apt-get install orthanc orthanc-dicomweb "
                     "(bash scripts/setup.sh as root)")


def orthanc_config(root: str | os.PathLike, port: int) -> dict:
    """The configuration of an Orthanc storing under ``root``: HTTP on ``port``, no remote access
    (Orthanc 1.10 cannot bind one address: it refuses every client but 127.0.0.1), no DICOM
    (DIMSE) port, no authentication (loopback only), DICOMweb at ``/dicom-web/``."""
    root = Path(root).resolve()
    return {
        "Name": "DEEPMINER", "StorageDirectory": str(root / "db"), "IndexDirectory": str(root / "db"),
        "HttpPort": int(port), "RemoteAccessAllowed": False, "AuthenticationEnabled": False,
        "DicomServerEnabled": False, "HttpCompressionEnabled": False, "StorageCompression": False,
        "ConcurrentJobs": 2, "Plugins": [dicomweb_plugin()],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": False, "StudiesMetadata": "Full",
                     "SeriesMetadata": "Full"},
    }


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a closed server's TIME_WAIT is no owner
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


class Orthanc:
    """An Orthanc under ``root`` (config, database, log), on loopback ``port``; :meth:`start` /
    :meth:`stop` (also a context manager). Never the system service: the process is ours."""

    def __init__(self, root: str | os.PathLike, port: int = DEFAULT_PORT):
        self.root = Path(root)
        self.port = int(port)
        self.proc: subprocess.Popen | None = None
        self.started_s: float | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def dicomweb_url(self) -> str:
        return f"{self.url}/dicom-web"

    def write_config(self) -> Path:
        if shutil.which(ORTHANC_BIN) is None and not Path("/usr/sbin/Orthanc").is_file():
            raise InputError("Orthanc is not installed: apt-get install orthanc orthanc-dicomweb "
                             "(bash scripts/setup.sh as root)")
        (self.root / "db").mkdir(parents=True, exist_ok=True)
        path = self.root / "orthanc.json"
        path.write_text(json.dumps(orthanc_config(self.root, self.port), indent=1) + "\n", encoding="utf-8")
        return path

    def command(self) -> list[str]:
        exe = shutil.which(ORTHANC_BIN) or "/usr/sbin/Orthanc"
        return [exe, str(self.write_config())]

    def start(self, timeout: float = 60.0) -> Orthanc:
        if not _port_free(self.port):
            raise InputError(f"port {self.port} is in use: set DEEPMINER_PACS_PORT to a free port")
        import requests

        t0 = time.monotonic()
        cmd = self.command()  # writes the configuration (and makes root)
        log = open(self.root / "orthanc.log", "wb")
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=self.root,
                                     start_new_session=True)
        log.close()
        while True:
            if self.proc.poll() is not None:
                tail = (self.root / "orthanc.log").read_text(errors="replace").strip().splitlines()[-1:]
                raise InputError(f"Orthanc exited ({self.proc.returncode}): {' '.join(tail)}")
            try:
                if requests.get(f"{self.url}/system", timeout=1).ok:
                    break
            except requests.RequestException:
                pass
            if time.monotonic() - t0 > timeout:
                self.stop()
                raise InputError(f"Orthanc did not answer on port {self.port} within {timeout:.0f} s")
            time.sleep(0.1)
        self.started_s = time.monotonic() - t0
        return self

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None

    def __enter__(self) -> Orthanc:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def main(argv: Iterable[str] | None = None) -> int:
    """``python -m deepminer.pacs orthanc``: run a local Orthanc in the foreground (Procfile)."""
    parser = argparse.ArgumentParser(prog="python -m deepminer.pacs", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    o = sub.add_parser("orthanc", help="run a local Orthanc (DICOMweb on 127.0.0.1) in the foreground")
    o.add_argument("--root", default="var/pacs", help="folder for its configuration, database and files")
    o.add_argument("--port", type=int, default=int(os.environ.get("DEEPMINER_PACS_PORT", DEFAULT_PORT)),
                   help="HTTP port (DICOMweb at /dicom-web)")
    args = parser.parse_args(list(argv) if argv is not None else None)
    try:
        orth = Orthanc(args.root, args.port)
        cmd = orth.command()
    except InputError as err:
        print(f"pacs: error: {err}", flush=True)
        return 2
    print(f"pacs: Orthanc DICOMweb at {orth.dicomweb_url} (data in {Path(args.root).resolve()})", flush=True)
    os.execvp(cmd[0], cmd)  # the foreground process honcho supervises
    return 0  # pragma: no cover


if __name__ == "__main__":
    raise SystemExit(main())
