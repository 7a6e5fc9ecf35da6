"""Every path the gateway answers, in one table.

The routes are built from these templates, the access middleware names each request's audit
action from patterns derived from them (:func:`pattern`), the frames fast path matches
:data:`FRAMES_PATH`, and the URLs the gateway hands out (a study link, the viewer on some studies,
the next page of an access history) are made from them: a path changes here or nowhere.

Templates are Starlette's: ``{name}`` is one path segment, ``{name:path}`` the rest of the path.
DICOMweb templates are relative to :data:`DICOMWEB`, where they are mounted.
"""

from __future__ import annotations

import re

__all__ = [
    "HEALTH",
    "DICOMWEB",
    "QIDO_STUDIES",
    "QIDO_SERIES",
    "QIDO_INSTANCES",
    "QIDO_STUDY_SERIES",
    "QIDO_STUDY_INSTANCES",
    "QIDO_SERIES_INSTANCES",
    "STUDY",
    "SERIES",
    "INSTANCE",
    "METADATA",
    "STUDY_METADATA",
    "SERIES_METADATA",
    "INSTANCE_METADATA",
    "FRAMES",
    "BULK",
    "LINKS",
    "LINK",
    "LINK_USE_PREFIX",
    "LINK_USE",
    "GRANTS",
    "GRANT",
    "HIDDEN",
    "HIDDEN_STUDY",
    "EMERGENCY",
    "AUDIT",
    "SUBSCRIPTIONS",
    "SUBSCRIPTION",
    "CHANGES",
    "PRIORS",
    "FHIR",
    "FHIR_IMAGING_STUDIES",
    "FHIR_IMAGING_STUDY",
    "IID",
    "VIEWER",
    "VIEWER_STUDIES",
    "pattern",
    "QIDO_PATH",
    "STUDY_PATH",
    "FRAMES_PATH",
]

HEALTH = "/health"

# -- DICOMweb (PS3.18): QIDO-RS searches (10.6) and WADO-RS retrieves (10.4) ---------------------

DICOMWEB = "/dicom-web"

STUDY = "/studies/{study}"
SERIES = STUDY + "/series/{series}"
INSTANCE = SERIES + "/instances/{instance}"

QIDO_STUDIES = "/studies"
QIDO_SERIES = "/series"
QIDO_INSTANCES = "/instances"
QIDO_STUDY_SERIES = STUDY + "/series"
QIDO_STUDY_INSTANCES = STUDY + "/instances"
QIDO_SERIES_INSTANCES = SERIES + "/instances"

METADATA = "/metadata"
STUDY_METADATA = STUDY + METADATA
SERIES_METADATA = SERIES + METADATA
INSTANCE_METADATA = INSTANCE + METADATA
FRAMES = INSTANCE + "/frames/{frames}"
BULK = INSTANCE + "/bulk/{tag_path:path}"

# -- the access API, study links, IHE Invoke Image Display (gateway/api) ---------------------------

LINKS = "/api/links"
LINK = LINKS + "/{id}"
LINK_USE_PREFIX = "/link/"  # everything under it is a link's use (and its secret is redacted)
LINK_USE = LINK_USE_PREFIX + "{secret}"
GRANTS = "/api/grants"
GRANT = GRANTS + "/{id}"
HIDDEN = "/api/hidden"
HIDDEN_STUDY = HIDDEN + "/{uid}"
EMERGENCY = "/api/emergency"
AUDIT = "/api/audit"
SUBSCRIPTIONS = "/api/subscriptions"  # new-study notifications (gateway/api/subscriptions.py)
SUBSCRIPTION = SUBSCRIPTIONS + "/{id}"
CHANGES = "/api/changes"  # the change feed (gateway/api/changes.py)
PRIORS = "/api/priors"  # a study's relevant priors (gateway/api/priors.py)
IID = "/IHEInvokeImageDisplay"  # IHE RAD TF-2 4.106

# -- FHIR R4 (gateway/api/fhir.py): a patient's imaging history for EHRs and portals ----------------

FHIR = "/fhir"
FHIR_IMAGING_STUDIES = FHIR + "/ImagingStudy"  # search
FHIR_IMAGING_STUDY = FHIR_IMAGING_STUDIES + "/{study}"  # read: the id is the StudyInstanceUID

# -- the OHIF viewer (gateway/viewer) ---------------------------------------------------------------

VIEWER = "/viewer"
VIEWER_STUDIES = VIEWER + "/viewer"  # OHIF's client-side route for one or more studies

# -- patterns matched against a request's path ------------------------------------------------------

_PLACEHOLDER = re.compile(r"\{(\w+)(:path)?\}")


def pattern(template: str, tail: str = "$") -> re.Pattern[str]:
    """A regular expression matching ``template`` from the start of a path, then ``tail``.

    Each placeholder is a capturing group, unnamed: a template may repeat in an alternation
    (:data:`QIDO_PATH`) where named groups could not."""
    return re.compile("^" + _regex(template) + tail)


def _regex(template: str) -> str:
    out, last = [], 0
    for found in _PLACEHOLDER.finditer(template):
        out += [re.escape(template[last : found.start()]), "(.*)" if found.group(2) else "([^/]+)"]
        last = found.end()
    return "".join(out) + re.escape(template[last:])


_QIDO = (
    QIDO_STUDIES,
    QIDO_SERIES,
    QIDO_INSTANCES,
    QIDO_STUDY_SERIES,
    QIDO_STUDY_INSTANCES,
    QIDO_SERIES_INSTANCES,
)
# Any QIDO-RS resource, the bare prefix too, with or without a trailing slash.
QIDO_PATH = pattern(DICOMWEB, "(" + "|".join(_regex(t) for t in _QIDO) + ")?/?$")
# Any path under one study; group 1 is its StudyInstanceUID.
STUDY_PATH = pattern(DICOMWEB + STUDY, "")
# The hot path's match: groups are the study, series and instance UIDs and the frame list.
FRAMES_PATH = pattern(DICOMWEB + FRAMES)
