"""Relevant priors: the patient's other studies a reader wants beside the current one, ranked, each
with its reasons (the rules: ``gateway.registry.priors``; README, "Relevant priors").

    GET    /api/priors?StudyInstanceUID=<uid>[&limit=5]

The policy decides on the current study first, with the one refusal of the rest of the API (a
study that does not exist, is hidden, or was not granted gets the same answer); the priors are
then the patient's studies the caller may see (as QIDO: the rest left out silently), across
every source, joined by INS. The audit record names the study and every patient carried.
"""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from gateway import urls
from gateway.api.common import access_of, json_answer, run
from gateway.api.middleware import audit_of
from gateway.errors import RequestError
from gateway.redact import escape
from gateway.registry.history import StudySummary, study_history
from gateway.registry.priors import CANDIDATES, Prior, modalities_of, rank_priors, regions_of

__all__ = [
    "ROUTES", "relevant_priors", "prior_json", "DEFAULT_LIMIT", "MAX_LIMIT",
]  # fmt: skip

DEFAULT_LIMIT, MAX_LIMIT = 5, 50
_KNOWN = ("StudyInstanceUID", "limit")


async def relevant_priors(request: Request) -> Response:
    access = access_of(request)
    principal = request.scope["state"]["principal"]
    noted = audit_of(request.scope)
    params = request.query_params
    unknown = sorted(key for key in params if key not in _KNOWN)
    if unknown:
        names = ", ".join(repr(escape(key, 64)) for key in unknown[:10])
        raise RequestError(f"unknown parameter(s) {names}: this route takes {', '.join(_KNOWN)}")
    study = params.get("StudyInstanceUID", "")
    if not study:
        raise RequestError("StudyInstanceUID: required (the current study)")
    limit_text = params.get("limit", str(DEFAULT_LIMIT))
    if not (limit_text.isascii() and limit_text.isdigit() and 1 <= int(limit_text) <= MAX_LIMIT):
        raise RequestError(f"limit: an integer from 1 to {MAX_LIMIT} is required")
    noted["study"] = study
    allowed = await run(access.policy.check_study, principal, study)
    noted["patient"], noted["emergency"] = allowed.patient, allowed.emergency
    restriction = await run(access.policy.restriction, principal)
    current, others = await run(study_history, access.policy.registry, study, restriction, CANDIDATES)
    if current is None:  # removed since the decision: nothing to rank
        return json_answer({"StudyInstanceUID": study, "patient": allowed.patient, "priors": []})
    ranked = rank_priors(current, others.studies, int(limit_text))
    patients = {p.study.INS for p in ranked if p.study.INS}
    noted["patients"] = sorted(patients)
    if patients and not allowed.emergency:
        noted["emergency"] = await run(access.policy.emergency_among, principal, patients)
    return json_answer(
        {
            "StudyInstanceUID": study,
            "patient": current.INS,
            "ModalitiesInStudy": list(current.modalities),
            "regions": regions_of(current),
            "candidates": min(others.total, CANDIDATES),
            "priors": [prior_json(prior) for prior in ranked],
        }
    )


def prior_json(prior: Prior) -> dict[str, Any]:
    study: StudySummary = prior.study
    return {
        "StudyInstanceUID": study.StudyInstanceUID,
        "StudyDate": study.StudyDate,
        "StudyTime": study.StudyTime,
        "StudyDescription": study.StudyDescription,
        "AccessionNumber": study.AccessionNumber,
        "ModalitiesInStudy": list(study.modalities),
        "BodyPartExamined": list(study.body_parts),
        "regions": sorted(regions_of(study)),
        "image_modalities": sorted(modalities_of(study)),
        "NumberOfStudyRelatedSeries": len(study.series),
        "NumberOfStudyRelatedInstances": study.instances,
        "sources": list(study.sources),
        "score": prior.score,
        "reasons": [{"rule": r.rule, "points": r.points, "detail": r.detail} for r in prior.reasons],
    }


ROUTES = [Route(urls.PRIORS, relevant_priors, methods=["GET"])]
