"""Record files as users meet them: shareable modes, short validation messages, a newer file
that asks for an upgrade, and a final write that fails without losing the record."""
from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from asam_tune.costmodel import make_plan
from asam_tune.errors import RecordError, UserInputError
from asam_tune.records import Plan, Profile, dump_record, load_record, parse_record, write_atomic
from asam_tune.records import base
from tests.fixtures.costmodel_profiles import gpu_with_cpu
from tests.record_factories import small_profile


@pytest.fixture
def umask():
    """Set the process's umask for one test; the old one comes back after it."""
    saved = os.umask(0o022)
    os.umask(saved)

    def set_mask(mask: int) -> None:
        os.umask(mask)

    yield set_mask
    os.umask(saved)


@pytest.mark.parametrize("mask, mode", [(0o022, 0o644), (0o027, 0o640), (0o002, 0o664)])
def test_written_files_get_the_usual_mode_under_the_umask(tmp_path, umask, mask, mode):
    umask(mask)
    dump_record(small_profile(), tmp_path / "profile.json")
    write_atomic(tmp_path / "result.json", "{}\n")
    for name in ("profile.json", "result.json"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == mode


def test_a_rewritten_file_gets_the_usual_mode_too(tmp_path, umask):
    umask(0o022)
    path = tmp_path / "plan.json"
    path.write_text("{}")
    path.chmod(0o600)
    dump_record(small_profile(), path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


def test_a_cross_field_error_shows_the_field_and_its_problem_not_the_document(tmp_path):
    document = json.loads(make_plan(gpu_with_cpu(), 100).to_json())
    assert len(json.dumps(document)) > 2000
    document["perturbation_batch_size"] = 500  # more than the batch: only the whole plan can tell
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(document))
    with pytest.raises(RecordError) as caught:
        load_record(Plan, path)
    message = str(caught.value)
    assert "perturbation_batch_size 500 exceeds batch_size 100" in message
    assert len(message) < len(str(path)) + 150 and "\n" not in message
    assert "profile_fingerprint" not in message and "{" not in message


def test_a_bad_value_is_shown_and_a_long_one_cut(tmp_path):
    document = json.loads(small_profile().to_json())
    document["created_at"] = 12
    with pytest.raises(RecordError, match=r"at \$\.created_at: .*got 12$"):
        parse_record(Profile, document)
    document = json.loads(small_profile().to_json())
    document["devices"][0]["config"]["device"] = "tpu" * 100
    with pytest.raises(RecordError) as caught:
        parse_record(Profile, document)
    assert "tputpu" in str(caught.value) and "..." in str(caught.value) and len(str(caught.value)) < 300


def test_a_nested_cross_field_error_names_the_object_without_dumping_it():
    document = json.loads(make_plan(gpu_with_cpu(), 100).to_json())
    document["perturbation"]["key"] = "cpu/9t"
    with pytest.raises(RecordError) as caught:
        parse_record(Plan, document)
    message = str(caught.value)
    assert "at $.perturbation: key 'cpu/9t' does not match the device fields" in message
    assert "'device':" not in message


@pytest.mark.parametrize("cls, document", [
    (Profile, lambda: json.loads(small_profile().to_json())),
    (Plan, lambda: json.loads(make_plan(gpu_with_cpu(), 100).to_json())),
])
def test_a_future_schema_version_asks_for_an_upgrade(cls, document):
    newer = document()
    newer["schema_version"] = 7
    with pytest.raises(RecordError, match=r"schema_version 7 was written by a newer asam-tune .*upgrade asam-tune"):
        parse_record(cls, newer)
    nonsense = document()
    nonsense["schema_version"] = "two"
    with pytest.raises(RecordError, match="expected") as caught:
        parse_record(cls, nonsense)
    assert "newer" not in str(caught.value)


def test_an_unknown_field_suggests_a_newer_writer():
    document = json.loads(small_profile().to_json())
    document["sparkles"] = True
    with pytest.raises(RecordError, match=r"\$\.sparkles: extra inputs are not permitted.*newer asam-tune"):
        parse_record(Profile, document)


def test_a_failed_final_write_keeps_the_record_in_a_named_temporary_file(tmp_path, monkeypatch):
    profile = small_profile()
    target = tmp_path / "out" / "profile.json"
    real_replace = os.replace

    def disk_full(source, destination):
        if str(destination) == str(target):
            raise OSError(28, "No space left on device")
        return real_replace(source, destination)

    monkeypatch.setattr(base.os, "replace", disk_full)
    with pytest.raises(UserInputError) as caught:
        base.save_or_keep(profile, target, "profile")
    message = str(caught.value)
    assert "No space left on device" in message and "\n" not in message
    kept = message.split("is kept in ")[1].split(":")[0]
    try:
        assert load_record(Profile, kept) == profile
        assert not target.exists() and not list(target.parent.glob(".*.tmp"))
    finally:
        os.unlink(kept)


def test_save_or_keep_writes_normally_when_it_can(tmp_path):
    base.save_or_keep(small_profile(), tmp_path / "p.json", "profile")
    assert load_record(Profile, tmp_path / "p.json") == small_profile()


def _shipped_records():
    import glob

    root = Path(__file__).resolve().parents[2]
    paths = sorted(glob.glob(str(root / "profiles" / "*.json")) + glob.glob(str(root / "docs" / "results" / "*.json"))
                   + glob.glob(str(root / "tests" / "fixtures" / "*.json")))
    kinds = {"asam-tune-profile": "Profile", "asam-tune-plan": "Plan"}
    found = []
    for path in paths:
        document = json.loads(Path(path).read_text())
        if isinstance(document, dict) and document.get("kind") in kinds:
            found.append(pytest.param(path, kinds[document["kind"]], id=Path(path).name))
    return found


@pytest.mark.parametrize("path, kind", _shipped_records())
def test_every_shipped_record_loads_and_keeps_its_hash(path, kind):
    """Plans record their profile's content hash: a file must hash the same loaded as raw, whatever
    fields were added to its schema since it was written."""
    import hashlib

    from asam_tune import records

    raw = json.loads(Path(path).read_text())
    expected = hashlib.sha256(json.dumps(raw, sort_keys=True, allow_nan=False,
                                         separators=(",", ":")).encode()).hexdigest()
    assert records.load_record(getattr(records, kind), path).content_hash() == expected
