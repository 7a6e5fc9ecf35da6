"""Load profiles for locust: the gateway as viewers, the patient portal and a sync client use it.

    locust -f bench/locustfile.py --headless -u 100 -r 10 -t 2m --host http://127.0.0.1:8080 Radiologist

``--host`` is the gateway's origin (DICOMweb is under ``/dicom-web``). Three user classes, chosen
by name on the command line (all three without one) or with ``--class-picker`` in the web UI; their
tasks are tagged ``viewer``, ``portal`` and ``sync`` (locust's tags filter tasks, not classes, so
``--tags`` goes with the matching class names):

- ``Radiologist`` opens a study the way the OHIF viewer (3.12) does, as seen on the wire: the
  worklist QIDO, the study by StudyInstanceUID, the patient's other studies by PatientID, the
  series list, each series' ``/metadata``, then every frame of the study, ``BROWSER_CONNECTIONS``
  at a time (a browser opens 6 connections per host, so OHIF's ~25 prefetch requests queue
  behind those 6).
- ``PortalUser`` lists a patient's studies, creates a study link, opens it in a separate cookie
  jar (a 303 with a session cookie; the viewer's files are not fetched), reads the study's
  ``/metadata`` with that cookie, lists its links, and revokes its oldest ones.
- ``Harvester`` is one light QIDO poller (``fixed_count = 1``), like a PACS-sync client asking
  what changed since yesterday, with a paged full listing now and then. The gateway's own harvest
  of its sources cannot be triggered over HTTP: it runs at start and every ``interval`` seconds
  of each ``[[sources]]`` table, whatever the load.

Credentials: with ``[auth] open = true`` none are needed. With issuers, set ``GATEWAY_TOKEN`` (a
professional's bearer token: Radiologist and Harvester) and ``GATEWAY_PATIENT_TOKEN`` (a
patient's: PortalUser); on every worker process in a distributed run. Each caller only loads the
studies its token may see: they are listed once per process and token at start.

Every request is bounded (``REQUEST_SECONDS`` in all, ``network_timeout`` per socket operation)
and checked (status, and a readable answer: a frame must be a 200 whose first part is not
empty); requests are named by template so that locust's statistics aggregate them.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import quote, urlencode

import gevent
from gevent.lock import Semaphore
from gevent.pool import Pool
from locust import between, constant_pacing, tag, task
from locust.contrib.fasthttp import FastHttpSession, FastHttpUser, FastResponse, LocustBadStatusCode
from locust.exception import StopUser

log = logging.getLogger("locustfile")

T = TypeVar("T")

DICOMWEB = "/dicom-web"
QIDO_ACCEPT = {"Accept": "application/dicom+json"}
# OHIF's frame request, byte for byte (type unquoted): any stored syntax, no transcoding.
FRAME_ACCEPT = {"Accept": "multipart/related; type=application/octet-stream; transfer-syntax=*"}
# OHIF's study list parameters, in its order; includefield: StudyDescription, Modality.
WORKLIST = "limit=101&offset=0&fuzzymatching=false&includefield=00081030%2C00080060"
# OHIF's series list: SeriesDate, SeriesTime, SeriesDescription, SeriesNumber.
SERIES_FIELDS = "includefield=00080021%2C00080031%2C0008103E%2C00200011"

REQUEST_SECONDS = 30.0  # a whole request, body included: a slow trickle cannot hang a user
BROWSER_CONNECTIONS = 6  # a browser's HTTP/1.1 connections per host
KEEP_LINKS = 2  # active links a portal user keeps; older ones are revoked
SYNC_PAGE = 1000  # the gateway's largest QIDO page
SYNC_FULL_EVERY = 10  # polls between two full listings
SYNC_MAX_PAGES = 20  # a full listing stops there: the poller stays light


@dataclass(frozen=True)
class Study:
    StudyInstanceUID: str
    PatientID: str


class Refused(Exception):
    """An answer with the expected status that is still wrong (not JSON, an empty frame...)."""


# Studies visible to each Authorization header, listed once per process (workers included), so
# that a hundred users starting do not send a hundred discovery queries.
_discovered: dict[str | None, list[Study]] = {}
_discovery = Semaphore()


class _GatewayUser(FastHttpUser):
    abstract = True
    token_variable = "GATEWAY_TOKEN"
    needs_studies = True
    connection_timeout = 5.0
    network_timeout = 15.0  # per socket read or write; REQUEST_SECONDS bounds the whole request

    def on_start(self) -> None:
        token = os.environ.get(self.token_variable)
        self.auth = {"Authorization": f"Bearer {token}"} if token else {}
        self.studies = self._discover() if self.needs_studies else []

    def call(
        self,
        method: str,
        url: str,
        name: str,
        read: Callable[[FastResponse], T],
        *,
        expect: int = 200,
        client: FastHttpSession | None = None,
        credentials: bool = True,
        headers: dict[str, str] | None = None,
        **kwargs: Any,
    ) -> T | None:
        """One request, reported once as a success or a failure: what ``read`` makes of the
        answer, or None when the status was not ``expect`` or ``read`` refused the answer."""
        sent = {**(self.auth if credentials else {}), **(headers or {})}
        # TimeoutError is an OSError, one of the exceptions locust turns into this request's failure
        # (like a refused connection), wherever in the request the deadline falls.
        deadline = TimeoutError(f"no complete answer within {REQUEST_SECONDS:g} s")
        timer = gevent.Timeout(REQUEST_SECONDS, deadline)
        timer.start()
        try:
            response = (client or self.client).request(
                method, url, name=name, catch_response=True, headers=sent, **kwargs
            )
        finally:
            timer.close()
        value: T | None = None
        # Set when the connection failed or the body was cut short (a deadline included): a status
        # line alone is not an answer. A status locust finds unusual (201, 204) is judged below.
        error = response.request_meta.get("exception")
        if isinstance(error, LocustBadStatusCode):
            error = None
        with response:
            if error is not None or response.status_code == 0:
                response.failure(error or "no response")
            elif response.status_code != expect:
                body = (response.content or b"")[:200].decode("utf-8", "replace").strip()
                response.failure(f"status {response.status_code} (expected {expect}): {body}")
            else:
                # Any exception escaping here would drop the report: every reader error is a failure.
                try:
                    value = read(response)
                except Exception as exc:
                    response.failure(f"{type(exc).__name__}: {exc}")
                else:
                    response.success()
        return value

    def qido(self, path: str, name: str) -> list[dict[str, Any]] | None:
        return self.call("GET", f"{DICOMWEB}{path}", name, _dicom_json, headers=QIDO_ACCEPT)

    def _discover(self) -> list[Study]:
        key = self.auth.get("Authorization")
        with _discovery:
            if key not in _discovered:
                answer = self.qido(f"/studies?limit={SYNC_PAGE}&offset=0", "/studies [discovery]")
                studies = [Study(_value(a, "0020000D"), _value(a, "00100020")) for a in answer or []]
                if studies:
                    _discovered[key] = studies
        if key not in _discovered:
            given = "set" if key else "not set"
            log.error(
                "%s: no study visible (%s %s): stopping", type(self).__name__, self.token_variable, given
            )
            raise StopUser()
        return _discovered[key]


class Radiologist(_GatewayUser):
    """A radiologist opening studies in OHIF, one after another."""

    weight = 3
    wait_time = between(1, 5)  # reading a study, then the next one
    concurrency = BROWSER_CONNECTIONS  # geventhttpclient's connections for this user

    @tag("viewer")
    @task
    def open_study(self) -> None:
        self.qido(f"/studies?{WORKLIST}", "/studies [worklist]")
        study = random.choice(self.studies)
        uid, patient = study.StudyInstanceUID, quote(study.PatientID, safe="")
        self.qido(f"/studies?{WORKLIST}&StudyInstanceUID={uid}", "/studies?StudyInstanceUID")
        self.qido(f"/studies?00100020={patient}&{WORKLIST}", "/studies?PatientID")
        series = self.qido(f"/studies/{uid}/series?{SERIES_FIELDS}", "/studies/{s}/series") or []
        pool = Pool(BROWSER_CONNECTIONS)
        try:
            metadata = pool.map(
                lambda se: self.qido(
                    f"/studies/{uid}/series/{se}/metadata", "/studies/{s}/series/{se}/metadata"
                ),
                [_value(s, "0020000E") for s in series],
            )
            for url in _frame_urls(uid, [m for m in metadata if m]):
                pool.spawn(self.call, "GET", url, "/frames", _frame_part, headers=FRAME_ACCEPT)
            pool.join()
        finally:
            pool.kill()  # a stopping user takes its frame requests with it


class PortalUser(_GatewayUser):
    """The national patient portal: a patient shares one of their studies by link."""

    weight = 2
    wait_time = between(2, 6)
    token_variable = "GATEWAY_PATIENT_TOKEN"

    def on_start(self) -> None:
        super().on_start()
        # Whoever opens a link does so in their own browser: its cookie jar is not the portal's
        # (whose calls carry the patient's token, or nothing in open access, where a session
        # cookie would make them a read-only link's calls).
        self.browser = FastHttpSession(
            self.host,
            self.environment.events.request,
            self,
            network_timeout=self.network_timeout,
            connection_timeout=self.connection_timeout,
        )
        self.links: deque[str] = deque()

    @tag("portal")
    @task
    def share_study(self) -> None:
        patient = quote(random.choice(self.studies).PatientID, safe="")
        studies = self.qido(f"/studies?PatientID={patient}&limit=100&offset=0", "/studies?PatientID [portal]")
        if not studies:
            return
        uid = _value(random.choice(studies), "0020000D")
        link = self.call(
            "POST",
            "/api/links",
            "/api/links",
            _link,
            expect=201,
            json={"StudyInstanceUID": uid, "expires_in": 3600},
        )
        if not link:
            return
        self.links.append(link["id"])
        self.browser.cookiejar.clear()
        opened = self.call(
            "GET",
            link["url"],
            "/link/{secret}",
            _viewer_redirect,
            expect=303,
            client=self.browser,
            credentials=False,
            allow_redirects=False,
        )
        if opened:
            self.call(
                "GET",
                f"{DICOMWEB}/studies/{uid}/metadata",
                "/studies/{s}/metadata [link]",
                _dicom_json,
                client=self.browser,
                credentials=False,
                headers=QIDO_ACCEPT,
            )
        self.call("GET", "/api/links", "/api/links", _json)
        while len(self.links) > KEEP_LINKS:
            self.call("DELETE", f"/api/links/{self.links.popleft()}", "/api/links/{id}", _empty, expect=204)


class Harvester(_GatewayUser):
    """A PACS-sync client polling for new studies: light QIDO, and always exactly one of it."""

    fixed_count = 1
    wait_time = constant_pacing(30)
    needs_studies = False

    def on_start(self) -> None:
        super().on_start()
        self.polls = 0

    @tag("sync")
    @task
    def poll(self) -> None:
        since = time.strftime("%Y%m%d", time.gmtime(time.time() - 86400))
        self.qido(f"/studies?StudyDate={since}-&limit={SYNC_PAGE}&offset=0", "/studies?StudyDate [sync]")
        if self.polls % SYNC_FULL_EVERY == 0:
            for page in range(SYNC_MAX_PAGES):
                query = urlencode({"limit": SYNC_PAGE, "offset": page * SYNC_PAGE})
                answer = self.qido(f"/studies?{query}", "/studies [sync, full]")
                if answer is None or len(answer) < SYNC_PAGE:
                    break
        self.polls += 1


# -- reading answers: each returns a value or raises (the request is then a failure) ---------------


def _json(response: FastResponse) -> Any:
    # json.loads on the bytes: locust's .text would guess the charset of large bodies first.
    return json.loads(response.content or b"")


def _link(response: FastResponse) -> dict[str, Any]:
    value = _json(response)
    if (
        not isinstance(value, dict)
        or not isinstance(value.get("id"), str)
        or not isinstance(value.get("url"), str)
    ):
        raise Refused("expected a link: {id, url, expires_at}")
    return value


def _dicom_json(response: FastResponse) -> list[dict[str, Any]]:
    value = _json(response) if response.content else []  # 204 or an empty body: no match
    if not isinstance(value, list):
        raise Refused("expected a DICOM JSON array")
    return value


def _empty(response: FastResponse) -> bool:
    return True


def _viewer_redirect(response: FastResponse) -> bool:
    location = _header(response, "location")
    if not location.startswith("/viewer/"):
        raise Refused(f"redirected to {location!r}, not to the viewer")
    if "gateway_session=" not in _header(response, "set-cookie"):
        raise Refused("no session cookie")
    return True


_BOUNDARY = re.compile(r'boundary="?([^";]+)"?', re.IGNORECASE)


def _frame_part(response: FastResponse) -> int:
    """The size of the first part of a multipart answer (PS3.18 8.6.1.2): one frame asked, one part."""
    media_type = _header(response, "content-type")
    body = response.content or b""
    found = _BOUNDARY.search(media_type)
    if not media_type.lower().startswith("multipart/related") or not found:
        raise Refused(f"not a multipart answer: {media_type!r}")
    delimiter = b"--" + found.group(1).encode("latin-1")
    start = body.find(delimiter)
    headers_end = body.find(b"\r\n\r\n", start) if start >= 0 else -1
    end = body.find(b"\r\n" + delimiter, headers_end) if headers_end >= 0 else -1
    if end < 0:
        raise Refused(f"truncated multipart body ({len(body)} bytes)")
    size = end - headers_end - 4
    if size <= 0:
        raise Refused("empty frame")
    return size


def _header(response: FastResponse, name: str) -> str:
    """A response header, its repeats joined (geventhttpclient gives a list for those)."""
    value = response.headers.get(name) if response.headers else None
    return ", ".join(value) if isinstance(value, list) else value or ""


def _value(element: dict[str, Any], attribute: str) -> Any:
    """The first value of a DICOM JSON attribute (PS3.18 F.2.2), or "" when it has none."""
    values = element.get(attribute, {}).get("Value") or [""]
    return values[0]


def _frame_urls(study: str, series_metadata: list[list[dict[str, Any]]]) -> list[str]:
    """One URL per frame of each image, in series order, as OHIF asks for them."""
    urls = []
    for instances in series_metadata:
        for instance in instances:
            if "7FE00010" not in instance:  # no pixel data (a report): the viewer asks no frames
                continue
            series, sop = _value(instance, "0020000E"), _value(instance, "00080018")
            count = int(_value(instance, "00280008") or 1)  # IS: a number, or a string from some PACS
            base = f"{DICOMWEB}/studies/{study}/series/{series}/instances/{sop}/frames"
            urls += [f"{base}/{n}" for n in range(1, count + 1)]
    return urls
