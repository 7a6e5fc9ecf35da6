"""The ranking of relevant priors (pure): a table of cases, each a current study, the patient's
other studies, and the order and reasons expected."""

from __future__ import annotations

import pytest

from gateway.registry.history import SeriesSummary, StudySummary
from gateway.registry.priors import rank_priors, regions_of


def study(
    uid: str,
    date: str | None,
    *modalities: str,
    part: str | None = None,
    description: str | None = None,
    series_description: str | None = None,
    anatomy: tuple[tuple[str, str], ...] = (),
) -> StudySummary:
    series = tuple(
        SeriesSummary(f"{uid}.{n}", n, m, series_description, part, 10, anatomy)
        for n, m in enumerate(modalities or ("OT",), 1)
    )
    return StudySummary(uid, date, "100000", description, None, "P", "SITE", "INS", 10, series, ("a",))


CT_CHEST = study("now", "20240601", "CT", part="CHEST")

CASES = [
    pytest.param(
        CT_CHEST,
        [study("mr-head", "20240501", "MR", part="HEAD"), study("ct-chest", "20200101", "CT", part="CHEST")],
        ["ct-chest", "mr-head"],
        id="same modality and region outrank recency",
    ),
    pytest.param(
        study("now", "20240601", "DX", part="CHEST"),
        [study("cr", "20240101", "CR"), study("us", "20240102", "US")],
        ["cr", "us"],
        id="CR and DX are one modality",
    ),
    pytest.param(
        CT_CHEST,
        [
            study("mr-knee", "20240301", "MR", part="KNEE"),
            study("fr", "20190101", "MR", description="IRM THORACIQUE"),
        ],
        ["fr", "mr-knee"],
        id="a French description word finds the region",
    ),
    pytest.param(
        study("now", "20240601", "CT", description="TDM ABDO"),
        [study("tap", "20210101", "MR", description="TDM TAP"), study("head", "20230101", "MR", part="HEAD")],
        ["tap", "head"],
        id="TAP covers the chest, abdomen and pelvis",
    ),
    pytest.param(
        CT_CHEST,
        [study("coded", "20150101", "MR", anatomy=(("SCT", "816094009"),)), study("us", "20150102", "US")],
        ["coded", "us"],
        id="an anatomic region code finds the region",
    ),
    pytest.param(
        CT_CHEST,
        [study("later", "20250101", "CT", part="CHEST"), study("before", "20100101", "US")],
        ["before"],
        id="later studies are not priors",
    ),
    pytest.param(
        study("now", "20240601", "CT", "SR"),
        [study("sr", "20240501", "SR"), study("ct", "20100101", "CT")],
        ["ct", "sr"],
        id="a report series is no common modality",
    ),
    pytest.param(
        CT_CHEST,
        [study("undated", None, "US"), study("old", "20000101", "US")],
        ["old", "undated"],
        id="undated studies rank after dated ones of equal score",
    ),
]


@pytest.mark.parametrize(("current", "others", "expected"), CASES)
def test_priors_are_ranked_by_the_documented_rules(current, others, expected):
    assert [p.study.StudyInstanceUID for p in rank_priors(current, others, limit=10)] == expected


def test_each_prior_says_why_with_the_points_it_scored():
    others = [study("ct", "20240101", "CT", part="CHEST"), study("xa", "20000101", "XA")]
    best, worst = rank_priors(CT_CHEST, others, limit=10)
    rules = [(r.rule, r.points) for r in best.reasons]
    assert rules == [("modality", 4), ("region", 3), ("recent", 2), ("last", 1)]
    assert best.score == 10
    assert "CT" in best.reasons[0].detail and "BodyPartExamined CHEST" in best.reasons[1].detail
    assert "152 days" in best.reasons[2].detail
    assert [r.rule for r in worst.reasons] == ["last"]  # the last 2 studies: both of them


def test_the_last_n_are_the_most_recent_priors_and_a_point_each():
    others = [study(f"us-{n}", f"2024010{n}", "US") for n in range(1, 5)]
    ranked = rank_priors(CT_CHEST, others, limit=10, last=2)
    assert [p.study.StudyInstanceUID for p in ranked] == ["us-4", "us-3", "us-2", "us-1"]
    assert [p.score for p in ranked] == [3, 3, 2, 2]


def test_the_limit_cuts_the_ranking():
    others = [study(f"ct-{n}", f"2024010{n}", "CT") for n in range(1, 6)]
    assert len(rank_priors(CT_CHEST, others, limit=3)) == 3


@pytest.mark.parametrize(
    ("summary", "regions"),
    [
        (study("a", "20240101", "CT", part="CHESTABDPELVIS"), {"CHEST", "ABDOMEN", "PELVIS"}),
        (study("b", "20240101", "MR", description="IRM cérébrale"), {"HEAD"}),
        (study("c", "20240101", "CT", series_description="Thoraco-abdominal"), {"CHEST", "ABDOMEN"}),
        (study("d", "20240101", "MR", description="ABDOMINOPELVIEN"), {"ABDOMEN", "PELVIS"}),
        (study("e", "20240101", "MR", part="GENOU DROIT"), {"LOWER LIMB"}),  # a term no table holds
        (study("f", "20240101", "CT", anatomy=(("SRT", "T-D3000"),)), {"CHEST"}),
        (study("g", "20240101", "CT", description="BENCH 42"), set()),
    ],
    ids=["composite term", "accented French", "hyphenated", "prefix", "free text part", "SRT code", "none"],
)
def test_regions_come_from_body_parts_codes_and_description_words(summary, regions):
    assert set(regions_of(summary)) == regions
