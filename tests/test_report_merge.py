"""Merging facilities' structured entries into one report, on hand-built answers."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from tools.gateway_client import ClinicalItem, FacilityItems
from tools.report_merge import SECTIONS, instant, merge, newest_first

SNOMED = "http://snomed.info/sct"
LOINC = "http://loinc.org"
RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"
ICD10 = "http://hl7.org/fhir/sid/icd-10"


def item(
    section: str, code: str, date: str, status: str = "", system: str = SNOMED, **kw: str
) -> ClinicalItem:
    display = kw.pop("display", f"thing {code}")
    return ClinicalItem(section, system, code, display, status, date, **kw)  # type: ignore[arg-type]


def answer(node_id: str, *items: ClinicalItem, status: str = "ok") -> FacilityItems:
    return FacilityItems(node_id, f"Org {node_id}", status, 12, items=list(items))


def test_same_code_at_two_facilities_is_one_row_with_both_sources() -> None:
    report = merge(
        [
            answer("gp", item("problems", "44054006", "2015-03-01", "active")),
            answer("hospital", item("problems", "44054006", "2019-06-10", "active")),
        ]
    )
    (row,) = report.section("problems").rows
    assert [s.node_id for s in row.sources] == ["hospital", "gp"]  # newest first
    assert [s.date for s in row.sources] == ["2019-06-10", "2015-03-01"]
    assert row.date == "2019-06-10" and row.status == "active"
    assert not row.statuses_differ and row.earlier == 0
    assert row.sources[0].organisation == "Org hospital"


def test_same_code_in_two_systems_stays_two_rows() -> None:
    report = merge(
        [
            answer("gp", item("problems", "1234", "2020-01-01", "active", system=SNOMED)),
            answer("hospital", item("problems", "1234", "2020-01-01", "active", system=ICD10)),
        ]
    )
    rows = report.section("problems").rows
    assert sorted(r.code_system for r in rows) == [ICD10, SNOMED]
    assert all(len(r.sources) == 1 for r in rows)


def test_conflicting_statuses_take_the_newest_and_list_all() -> None:
    report = merge(
        [
            answer("gp", item("problems", "195662009", "2021-02-01", "resolved")),
            answer("hospital", item("problems", "195662009", "2020-11-20", "active")),
        ]
    )
    (row,) = report.section("problems").rows
    assert row.status == "resolved" and row.statuses_differ
    assert {(s.node_id, s.status) for s in row.sources} == {
        ("gp", "resolved"),
        ("hospital", "active"),
    }


def test_missing_dates_sort_last_within_rows_and_sections() -> None:
    report = merge(
        [
            answer(
                "gp",
                item("allergies", "300916003", "", "active"),
                item("allergies", "91935009", "2018-04-02", "active"),
            ),
            answer("hospital", item("allergies", "300916003", "2010-01-01", "active")),
            answer("pharmacy", item("allergies", "419474003", "", "active")),
        ]
    )
    rows = report.section("allergies").rows
    assert [r.code for r in rows] == ["91935009", "300916003", "419474003"]
    undated_source = rows[1]
    assert [s.node_id for s in undated_source.sources] == ["hospital", "gp"]
    assert rows[2].date == ""


def test_latest_lab_result_wins_and_earlier_ones_are_counted() -> None:
    hba1c = "4548-4"
    report = merge(
        [
            answer(
                "gp",
                item("results", hba1c, "2019-01-05", system=LOINC, value="6.1", unit="%"),
                item(
                    "results",
                    hba1c,
                    "2022-08-30T09:00:00+02:00",
                    system=LOINC,
                    value="7.2",
                    unit="%",
                ),
            ),
            answer(
                "hospital",
                item("results", hba1c, "2021-03-03", system=LOINC, value="6.8", unit="%"),
            ),
        ]
    )
    (row,) = report.section("results").rows
    assert (row.value, row.unit, row.date) == ("7.2", "%", "2022-08-30T09:00:00+02:00")
    assert [s.node_id for s in row.sources] == ["gp"]
    assert row.earlier == 2


def test_the_same_latest_result_at_two_facilities_lists_both() -> None:
    same = {"system": LOINC, "value": "120", "unit": "mm[Hg]"}
    report = merge(
        [
            answer("gp", item("results", "8480-6", "2023-05-01T10:00:00Z", **same)),
            answer("hospital", item("results", "8480-6", "2023-05-01T12:00:00+02:00", **same)),
        ]
    )
    (row,) = report.section("results").rows
    assert {s.node_id for s in row.sources} == {"gp", "hospital"} and row.earlier == 0


def test_events_of_different_days_stay_apart_same_day_merges() -> None:
    report = merge(
        [
            answer(
                "gp",
                item("encounters", "185349003", "2020-01-01T09:00:00Z", "finished"),
                item("encounters", "185349003", "2021-01-01T09:00:00Z", "finished"),
            ),
            answer("hospital", item("encounters", "185349003", "2021-01-01T14:00:00Z")),
        ]
    )
    rows = report.section("encounters").rows
    assert [r.date[:4] for r in rows] == ["2021", "2020"]
    assert {s.node_id for s in rows[0].sources} == {"gp", "hospital"}


def test_recent_limit_caps_encounters_and_counts_the_rest() -> None:
    visits = [item("encounters", "185349003", f"20{n:02d}-01-01") for n in range(10, 20)]
    report = merge([answer("gp", *visits)], recent_limit=3)
    section = report.section("encounters")
    assert [r.date for r in section.rows] == ["2019-01-01", "2018-01-01", "2017-01-01"]
    assert section.omitted == 7
    assert len(merge([answer("gp", *visits)]).section("encounters").rows) == 10


def test_medication_shows_active_prescriptions_with_every_source() -> None:
    report = merge(
        [
            answer(
                "gp",
                item("medication", "860975", "2022-01-01", "active", system=RXNORM),
                item("medication", "314076", "2019-01-01", "stopped", system=RXNORM),
            ),
            answer("hospital", item("medication", "860975", "2023-01-01", "stopped",
                                    system=RXNORM)),
        ]
    )  # fmt: skip
    (row,) = report.section("medication").rows
    assert row.code == "860975" and row.status == "stopped" and row.statuses_differ
    assert {s.status for s in row.sources} == {"active", "stopped"}


def test_entered_in_error_is_dropped_and_older_entries_counted() -> None:
    report = merge(
        [
            answer(
                "gp",
                item("problems", "38341003", "2010-01-01", "active"),
                item("problems", "38341003", "2012-01-01", "active"),
                item("problems", "73211009", "2012-01-01", "entered-in-error"),
            )
        ]
    )
    (row,) = report.section("problems").rows
    assert row.code == "38341003" and row.date == "2012-01-01" and row.earlier == 1


def test_header_lists_every_facility_and_every_section_is_there() -> None:
    report = merge(
        [
            answer("gp", item("problems", "1", "2020")),
            FacilityItems("far", "Far away", "timeout", 3000, "no answer in 3000 ms"),
        ],
        patient="bsn|999",
        correlation_id="c-1",
    )
    assert [(f.node_id, f.status, f.items) for f in report.facilities] == [
        ("gp", "ok", 1),
        ("far", "timeout", 0),
    ]
    assert report.facilities[1].message == "no answer in 3000 ms"
    assert [s.name for s in report.sections] == list(SECTIONS)


def test_instant_reads_every_precision() -> None:
    assert instant("2020") == instant("2020-01-01") == instant("2020-01-01T00:00:00Z")
    assert instant("2020-05") == instant("2020-05-01T02:00:00+02:00")
    assert instant("") is None and instant("yesterday") is None


@given(
    st.lists(
        st.tuples(
            st.sampled_from(["gp", "hospital", "pharmacy"]),
            st.sampled_from(["problems", "results", "encounters", "allergies"]),
            st.sampled_from([SNOMED, LOINC]),
            st.sampled_from(["1", "2", "3"]),
            st.sampled_from(["", "2020", "2021-05-01", "2021-05-01T23:30:00-02:00", "later"]),
            st.sampled_from(["", "active", "resolved"]),
        ),
        max_size=30,
    )
)
def test_every_entry_is_shown_or_counted_and_rows_are_newest_first(
    entries: list[tuple[str, str, str, str, str, str]],
) -> None:
    by_node: dict[str, list[ClinicalItem]] = {}
    for node_id, section, system, code, when, status in entries:
        by_node.setdefault(node_id, []).append(item(section, code, when, status, system=system))
    report = merge([answer(node_id, *items) for node_id, items in by_node.items()])
    rows = [row for section in report.sections for row in section.rows]
    assert sum(len(row.sources) + row.earlier for row in rows) == len(entries)
    for section in report.sections:
        keys = [newest_first(row.date) for row in section.rows]
        assert keys == sorted(keys)
    for row in rows:
        assert len({s.node_id for s in row.sources}) == len(row.sources), "a facility once a row"
