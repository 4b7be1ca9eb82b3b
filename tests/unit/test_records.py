"""Profile records: round trip, strict validation with precise messages, fuzzed documents."""
from __future__ import annotations

import copy
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

from asam_tune.errors import RecordError
from asam_tune.records import Profile, dump_record, load_record, parse_record
from tests.record_factories import machine_load, small_profile, with_handover, with_machine_load

SHIPPED_PROFILES = sorted((Path(__file__).resolve().parents[2] / "profiles").glob("*.json"))


def document() -> dict:
    return json.loads(small_profile().to_json())


def test_round_trip_through_a_file_is_lossless(tmp_path):
    profile = small_profile()
    path = tmp_path / "p.json"
    dump_record(profile, path)
    assert load_record(Profile, path) == profile
    assert load_record(Profile, path).content_hash() == profile.content_hash()


def test_write_is_atomic_and_leaves_no_temporary_file(tmp_path):
    path = tmp_path / "sub" / "p.json"
    dump_record(small_profile(), path)
    dump_record(small_profile(), path)
    assert sorted(p.name for p in path.parent.iterdir()) == ["p.json"]


@pytest.mark.parametrize(
    "mutate, json_path, expected",
    [
        (lambda d: d.update(surprise=1), "$.surprise", "extra inputs are not permitted"),
        (lambda d: d["devices"][0]["points"][1].update(batch_size=16.5), "$.devices[0].points[1].batch_size",
         "valid integer"),
        (lambda d: d["devices"][0]["points"][0]["forward_backward"].update(median_s=0),
         "$.devices[0].points[0].forward_backward.median_s", "greater than 0"),
        (lambda d: d["devices"][0]["points"][0]["forward_backward"].update(median_s=-1.0),
         "$.devices[0].points[0].forward_backward.median_s", "greater than 0"),
        (lambda d: d.update(schema_version=99), "$.schema_version", "1 or 2"),
        (lambda d: d["devices"][0]["config"].update(device="tpu"), "$.devices[0].config.device", "pattern"),
        (lambda d: d.pop("workload"), "$.workload", "field required"),
    ],
)
def test_invalid_documents_name_the_file_the_path_and_the_expectation(tmp_path, mutate, json_path, expected):
    doc = document()
    mutate(doc)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(RecordError) as info:
        load_record(Profile, path)
    message = str(info.value)
    assert str(path) in message and json_path in message and expected in message.lower()
    assert "\n" not in message


def test_nan_and_infinity_literals_are_rejected(tmp_path):
    text = json.dumps(document()).replace('"iqr_s": 0.0', '"iqr_s": NaN', 1)
    path = tmp_path / "nan.json"
    path.write_text(text)
    with pytest.raises(RecordError, match="finite"):
        load_record(Profile, path)
    doc = document()
    doc["devices"][0]["points"][0]["forward_backward"]["median_s"] = math.inf
    with pytest.raises(RecordError):
        parse_record(Profile, doc)


@pytest.mark.parametrize("content, expected", [("", "valid JSON"), ("[1, 2]", "a JSON object"),
                                               ("{\"schema_version\": 1", "valid JSON")])
def test_corrupt_files_give_one_line_errors(tmp_path, content, expected):
    path = tmp_path / "corrupt.json"
    path.write_text(content)
    with pytest.raises(RecordError, match=expected):
        load_record(Profile, path)


def test_missing_file_is_a_record_error(tmp_path):
    with pytest.raises(RecordError, match="no such file"):
        load_record(Profile, tmp_path / "absent.json")


def test_handovers_round_trip_in_a_version_2_profile(tmp_path):
    profile = with_handover(small_profile())
    assert profile.schema_version == 2
    path = tmp_path / "p.json"
    dump_record(profile, path)
    loaded = load_record(Profile, path)
    assert loaded == profile
    [point] = loaded.handovers
    assert (point.main, point.perturbation, point.per_step.median_s) == ("cpu/1t", "cpu/1t", 3e-4)


def test_a_version_1_document_loads_as_it_is(tmp_path):
    doc = document()
    doc["schema_version"] = 1
    del doc["handovers"]
    profile = parse_record(Profile, doc)
    assert (profile.schema_version, profile.handovers) == (1, ())
    # Written back it stays version 1, so its content hash (recorded in plans) is unchanged.
    path = tmp_path / "p.json"
    dump_record(profile, path)
    assert load_record(Profile, path).content_hash() == profile.content_hash()


def test_a_version_1_document_cannot_carry_handovers():
    doc = json.loads(with_handover(small_profile()).to_json())
    doc["schema_version"] = 1
    with pytest.raises(RecordError, match="handovers need schema_version 2"):
        parse_record(Profile, doc)


@pytest.mark.parametrize("path", SHIPPED_PROFILES, ids=lambda p: p.name)
def test_the_shipped_version_1_profiles_keep_loading(path):
    profile = load_record(Profile, path)
    assert profile.schema_version in (1, 2)
    assert profile.schema_version == 2 or profile.handovers == ()


@pytest.mark.parametrize("path", SHIPPED_PROFILES, ids=lambda p: p.name)
def test_the_shipped_profiles_are_written_back_as_they_were(path):
    # Unset optional fields stay out of the document, so the content hash that plans made from
    # these profiles record does not change (version 1 is written without handovers, as read).
    profile = load_record(Profile, path)
    stored = json.loads(path.read_text())
    written = json.loads(profile.to_json())
    assert written == stored
    if "machine_load" not in stored:  # made before the profiler recorded the load: nothing invented
        assert profile.machine_load is None
        assert all(c.main_cores is None and c.busy_cores is None for c in profile.contention)


def test_machine_load_and_contention_cores_round_trip(tmp_path):
    profile = with_machine_load(small_profile())
    path = tmp_path / "p.json"
    dump_record(profile, path)
    loaded = load_record(Profile, path)
    assert loaded == profile and loaded.content_hash() == profile.content_hash()
    assert loaded.machine_load == machine_load()
    assert (loaded.machine_load.start, loaded.machine_load.end) == ((0.2, 0.3, 0.4), (0.6, 0.4, 0.4))
    [point] = loaded.contention
    assert (point.main_cores, point.busy_cores) == ((0,), (1,))


def test_machine_load_without_load_averages_round_trips():
    # A system without os.getloadavg: the readings are null, the cores are still recorded.
    load = machine_load(start=None, end=None)
    profile = with_machine_load(small_profile(), load)
    assert parse_record(Profile, json.loads(profile.to_json())).machine_load == load


def test_a_version_2_document_written_before_machine_load_loads_and_keeps_its_hash():
    doc = document()
    assert "machine_load" not in doc and "main_cores" not in doc["contention"][0]
    profile = parse_record(Profile, doc)
    assert profile.machine_load is None and profile.contention[0].main_cores is None
    assert json.loads(profile.to_json()) == doc
    # A null written out explicitly means the same.
    assert parse_record(Profile, {**doc, "machine_load": None}).content_hash() == profile.content_hash()


@pytest.mark.parametrize("mutate, expected", [
    (lambda d: d.update(machine_load=json.loads(machine_load().to_json())), "machine_load needs schema_version 2"),
    (lambda d: d["contention"][0].update(main_cores=[0]), "main_cores and busy_cores need schema_version 2"),
    (lambda d: d["contention"][0].update(busy_cores=[1]), "main_cores and busy_cores need schema_version 2"),
])
def test_a_version_1_document_cannot_carry_the_version_2_fields(mutate, expected):
    doc = document()
    doc["schema_version"] = 1
    del doc["handovers"]
    mutate(doc)
    with pytest.raises(RecordError, match=expected):
        parse_record(Profile, doc)


@pytest.mark.parametrize("mutate, json_path, expected", [
    (lambda m: m.update(start=[0.1, 0.2]), "$.machine_load.start[2]", "field required"),
    (lambda m: m.update(end=[0.1, -0.2, 0.3]), "$.machine_load.end[1]", "greater than or equal to 0"),
    (lambda m: m.update(usable_cores=0), "$.machine_load.usable_cores", "greater than 0"),
    (lambda m: m.pop("usable_cores"), "$.machine_load.usable_cores", "field required"),
])
def test_invalid_machine_load_names_the_path(mutate, json_path, expected):
    doc = json.loads(with_machine_load(small_profile()).to_json())
    mutate(doc["machine_load"])
    with pytest.raises(RecordError) as info:
        parse_record(Profile, doc)
    assert json_path in str(info.value) and expected in str(info.value).lower()


def test_the_profilers_own_share_of_the_end_load():
    # 1.2 cores busy for a whole minute: 1.2 x (1 - 1/e) of the 1-minute average is its own.
    assert machine_load(elapsed_s=60.0, busy_cores=1.2).own_share_at_end() == pytest.approx(1.2 * (1 - math.exp(-1)))
    assert machine_load(elapsed_s=0.0).own_share_at_end() == 0.0
    # Not recorded: nothing is taken off.
    assert machine_load(elapsed_s=None, busy_cores=None).own_share_at_end() == 0.0


def test_another_kind_of_record_is_named_before_its_version():
    doc = document()
    doc.update(kind="asam-tune-plan", schema_version=1)
    with pytest.raises(RecordError, match=r"\$\.kind"):
        parse_record(Profile, doc)


def test_point_status_must_match_its_timings():
    doc = document()
    doc["devices"][0]["points"][0]["status"] = "oom"
    with pytest.raises(RecordError, match="carries no timings"):
        parse_record(Profile, doc)


def _paths(node, prefix=()):
    yield prefix
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _paths(value, prefix + (key,))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from _paths(value, prefix + (index,))


ALL_PATHS = [p for p in _paths(document()) if p]
ODD_VALUES = st.one_of(st.none(), st.booleans(), st.integers(-3, 10**12), st.floats(allow_nan=True),
                       st.text(max_size=5), st.lists(st.integers(), max_size=2),
                       st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))


@settings(max_examples=300, deadline=None)
@given(path=st.sampled_from(ALL_PATHS), value=ODD_VALUES, delete=st.booleans())
def test_mutated_documents_give_only_validation_errors_or_success(path, value, delete):
    doc = copy.deepcopy(document())
    parent = doc
    for key in path[:-1]:
        parent = parent[key]
    if delete and isinstance(parent, dict):
        del parent[path[-1]]
    else:
        parent[path[-1]] = value
    try:
        parse_record(Profile, doc)
    except RecordError:
        pass


def test_reading_a_profile_imports_no_torch(tmp_path):
    path = tmp_path / "p.json"
    dump_record(small_profile(), path)
    code = ("import sys; from asam_tune.records import Profile, load_record; "
            f"load_record(Profile, {str(path)!r}); print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
