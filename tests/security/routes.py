"""The route table the adversarial suite attacks: every route of the application, classified.

``app_routes`` reads the routes from the application itself, and ``test_every_route_is_classified``
fails when one is missing here, so a new route cannot skip the suite: whoever adds it says what it
is, and the attacks that apply to its kind run against it.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from starlette.routing import Mount


@dataclass(frozen=True)
class Route:
    method: str
    path: str  # Starlette's template: {study}, {series}, {instance}, {frames}, {tag_path:path}, ...
    kind: str  # see KINDS
    body: Any = None  # a JSON body that would be accepted ({study} filled in)


KINDS = {
    "study": "reads one study's data: the policy decides on the study in the path",
    "search": "QIDO over the index: the policy restricts the answer",
    "study-api": "acts on a study named in the body or query",
    "patient-api": "the patient's own settings and history",
    "caller-api": "the caller's own objects (links), or emergency access",
    "link": "exchanges a link secret for a session",
    "public": "no patient data: health probe, the viewer's files",
}

STUDY, SERIES, INSTANCE = "/dicom-web/studies/{study}", "/series/{series}", "/instances/{instance}"
TABLE = [
    Route("GET", "/health", "public"),
    Route("GET", "/viewer", "public"),
    Route("GET", "/dicom-web/studies", "search"),
    Route("GET", "/dicom-web/series", "search"),
    Route("GET", "/dicom-web/instances", "search"),
    Route("GET", STUDY + "/series", "study"),
    Route("GET", STUDY + "/instances", "study"),
    Route("GET", STUDY + SERIES + "/instances", "study"),
    Route("GET", STUDY, "study"),
    Route("GET", STUDY + SERIES, "study"),
    Route("GET", STUDY + SERIES + INSTANCE, "study"),
    Route("GET", STUDY + "/metadata", "study"),
    Route("GET", STUDY + SERIES + "/metadata", "study"),
    Route("GET", STUDY + SERIES + INSTANCE + "/metadata", "study"),
    Route("GET", STUDY + SERIES + INSTANCE + "/frames/{frames}", "study"),
    Route("GET", STUDY + SERIES + INSTANCE + "/bulk/{tag_path:path}", "study"),
    Route("POST", "/api/links", "study-api", {"StudyInstanceUID": "{study}", "expires_in": 600}),
    Route("GET", "/api/links", "caller-api"),
    Route("DELETE", "/api/links/{id}", "caller-api"),
    Route("GET", "/link/{secret}", "link"),
    Route("POST", "/api/grants", "patient-api", {"grantee": "10009"}),
    Route("GET", "/api/grants", "patient-api"),
    Route("DELETE", "/api/grants/{id}", "patient-api"),
    Route("POST", "/api/hidden", "study-api", {"StudyInstanceUID": "{study}"}),
    Route("GET", "/api/hidden", "patient-api"),
    Route("DELETE", "/api/hidden/{uid}", "patient-api"),
    Route("POST", "/api/emergency", "caller-api", {"patient": "2900275654321", "reason": "unconscious, 15"}),
    Route("GET", "/api/emergency", "patient-api"),
    Route("GET", "/api/audit", "patient-api"),
    Route(
        "POST",
        "/api/subscriptions",
        "caller-api",
        {"channel": {"type": "rest-hook", "endpoint": "https://ehr.example/hook"}, "scope": "all"},
    ),
    Route("GET", "/api/subscriptions", "caller-api"),
    Route("DELETE", "/api/subscriptions/{id}", "caller-api"),
    Route("GET", "/api/changes", "search"),
    Route("GET", "/fhir/ImagingStudy?patient.identifier=urn:oid:1.2.250.1.213.1.4.8|1800175123456", "search"),
    Route("GET", "/fhir/ImagingStudy/{study}", "study"),
    Route("GET", "/api/priors?StudyInstanceUID={study}", "study-api"),
    Route("GET", "/IHEInvokeImageDisplay?requestType=STUDY&studyUID={study}", "study-api"),
]


def app_routes(app: Any) -> set[tuple[str, str]]:
    """(method, path template) of every route the application answers (HEAD aside)."""

    def walk(routes: list[Any], prefix: str) -> Iterator[tuple[str, str]]:
        for route in routes:
            if isinstance(route, Mount):
                yield from walk(route.routes, prefix + route.path)
            else:
                for method in route.methods or ("GET",):
                    if method != "HEAD":
                        yield method, prefix + route.path

    return set(walk(app.starlette.routes, ""))


def of_kind(*kinds: str) -> list[Route]:
    return [route for route in TABLE if route.kind in kinds]


def route_id(route: Route) -> str:
    return f"{route.method} {route.path}"


@dataclass(frozen=True)
class Target:
    """What fills a route's template for one study."""

    study: str
    series: str = "1.2.3.4.5.6"
    instance: str = "1.2.3.4.5.6.7"

    def url(self, route: Route) -> str:
        path = route.path.replace("{tag_path:path}", "7FE00010")
        return path.format(
            study=self.study,
            series=self.series,
            instance=self.instance,
            frames="1",
            id="x",
            secret="x",
            uid="x",
        )

    def body(self, route: Route) -> Any:
        if route.body is None:
            return None
        return {
            k: v.replace("{study}", self.study) if isinstance(v, str) else v for k, v in route.body.items()
        }
