"""IHE Invoke Image Display (IHE RAD TF-2 4.106): another application opens the viewer on some
studies, or on a patient's study list, by a URL.

    GET    /IHEInvokeImageDisplay  ?requestType=STUDY&studyUID=...[&priors=N] | PATIENT&patientID=...

``priors=N`` (a gateway extension, 0 to 5) opens the first study with its N best relevant priors
beside it (``gateway.api.priors``: the patient's other studies the caller may see, sharing its
modality or body region); by default 2 when one study is named, 0 when several are (the caller
chose what to open). OHIF takes several studies as one comma-separated ``StudyInstanceUIDs``.
"""

from __future__ import annotations

from urllib.parse import quote, urlencode

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route

from gateway import urls
from gateway.api.common import access_of, run
from gateway.api.middleware import audit_of
from gateway.errors import RequestError
from gateway.redact import escape
from gateway.registry.priors import best_priors

__all__ = ["ROUTES", "invoke_image_display"]

_IID_STUDIES = 100  # studies one Invoke Image Display may open
_IID_PRIORS = 5  # priors one may ask to open beside the first study
_IID_DEFAULT_PRIORS = 2  # opened beside a single study unless priors=0


async def invoke_image_display(request: Request) -> Response:
    policy = access_of(request).policy
    noted = audit_of(request.scope)
    params = request.query_params
    kind = params.get("requestType", "").upper()
    principal = request.scope["state"]["principal"]
    if kind == "STUDY":
        studies = [uid for uid in params.get("studyUID", "").split(",") if uid]
        if not studies:
            raise RequestError("studyUID: required for requestType=STUDY")
        if len(studies) > _IID_STUDIES:
            raise RequestError(f"studyUID: at most {_IID_STUDIES} studies")
        # One study named: a radiologist opening it wants its best priors beside it (issue: the
        # viewer opens the current study with its priors); several named: the caller chose.
        wanted = params.get("priors", str(_IID_DEFAULT_PRIORS) if len(studies) == 1 else "0")
        if not (wanted.isascii() and wanted.isdigit() and int(wanted) <= _IID_PRIORS):
            raise RequestError(f"priors: an integer from 0 to {_IID_PRIORS} is required")
        patients: list[str] = []
        emergency = False
        for study in studies:
            allowed = await run(policy.check_study, principal, study)
            patients.append(allowed.patient or "")
            emergency |= allowed.emergency
        if int(wanted):
            restriction = await run(policy.restriction, principal)
            found = await run(best_priors, policy.registry, studies[0], restriction, int(wanted))
            for prior in found:
                if prior.study.StudyInstanceUID not in studies:
                    studies.append(prior.study.StudyInstanceUID)
                    patients.append(prior.study.INS or "")
                    emergency |= bool(prior.study.INS) and await run(
                        policy.emergency_among, principal, {prior.study.INS}
                    )
        # Every patient whose study the viewer is opened on, in the one record.
        noted["patients"], noted["emergency"] = list(dict.fromkeys(p for p in patients if p)), emergency
        if len(studies) == 1:
            noted["study"] = studies[0]
        target = f"{urls.VIEWER_STUDIES}?{urlencode({'StudyInstanceUIDs': ','.join(studies)})}"
        return RedirectResponse(target, 303)
    if kind == "PATIENT":
        patient = params.get("patientID")
        if not patient:
            raise RequestError("patientID: required for requestType=PATIENT")
        allowed = await run(policy.check_patient, principal, patient)
        noted["patient"], noted["emergency"] = patient, allowed.emergency
        # The study list, filtered by the viewer's own QIDO (which the policy filters again).
        return RedirectResponse(f"{urls.VIEWER}/?mrn={quote(patient)}", 303)
    raise RequestError(f"requestType: {escape(kind, 32) or 'missing'} is not STUDY or PATIENT")


ROUTES = [Route(urls.IID, invoke_image_display, methods=["GET"])]
