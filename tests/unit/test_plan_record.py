"""The plan record: lossless round trip, precise validation errors, old files keep loading."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from asam_tune.costmodel import make_plan
from asam_tune.costmodel.quality import measured_choice_update
from asam_tune.errors import RecordError
from asam_tune.records import NO_RHO_RULE, dump_record, load_record, parse_record
from asam_tune.records.plan import Plan, PerturbationDevice
from tests.fixtures.costmodel_profiles import affine, contention, gpu_with_cpu, profile, transfer

FIXTURE_V1 = Path(__file__).resolve().parents[1] / "fixtures" / "plan_v1.json"


def _plan() -> Plan:
    machine = profile(*gpu_with_cpu().devices, transfers=[transfer("cuda:0", "cpu", 0.002, 0.001)],
                      contention=[contention("cuda:0", "cpu/4t", 1.02)])
    return make_plan(machine, 100, min_perturbation_fraction=None)  # hides fully: b_p 18


def _write(tmp_path: Path, document: dict) -> Path:
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(document))
    return path


def test_round_trip_is_lossless(tmp_path):
    plan = _plan()
    dump_record(plan, tmp_path / "plan.json")
    loaded = load_record(Plan, tmp_path / "plan.json")
    assert loaded == plan
    assert loaded.content_hash() == plan.content_hash()
    assert not list(tmp_path.glob(".*.tmp"))  # the atomic write left no temporary file


def test_plan_carries_its_profile_identity():
    machine = gpu_with_cpu()
    plan = make_plan(machine, 100)
    assert plan.profile_hash == machine.content_hash()
    assert plan.profile_fingerprint == machine.fingerprint
    assert plan.workload.parameter_shapes_hash == machine.workload.parameter_shapes_hash
    assert plan.parameter_bytes == 4 * machine.workload.parameter_count


def test_the_version_1_fixture_keeps_loading():
    plan = load_record(Plan, FIXTURE_V1)
    assert (plan.schema_version, plan.kind, plan.mode) == (1, "asam-tune-plan", "staleness1")
    assert plan.perturbation.key == "cpu/4t" and plan.perturbation_batch_size == 15


@pytest.mark.parametrize("mutate, path, expected", [
    (lambda d: d.update(extra=1), "$.extra", "extra inputs are not permitted"),
    (lambda d: d.update(schema_version=3), "$.schema_version", "1 or 2"),
    (lambda d: d.update(kind="asam-tune-profile"), "$.kind", "asam-tune-plan"),
    (lambda d: d.update(batch_size=1.5), "$.batch_size", "integer"),
    (lambda d: d.update(batch_size="100"), "$.batch_size", "integer"),
    (lambda d: d.update(margin=1.0), "$.margin", "less than 1"),
    (lambda d: d["predictions"].update(sgd_step_s=0.0), "$.predictions.sgd_step_s", "greater than 0"),
    (lambda d: d["predictions"].update(contention="guessed"), "$.predictions.contention", "measured"),
    (lambda d: d.update(mode="eager"), "$.mode", "staleness1"),
    (lambda d: d.update(profile_hash="abc"), "$.profile_hash", "pattern"),
    (lambda d: d["perturbation"].update(device="tpu:0"), "$.perturbation.device", "pattern"),
    (lambda d: d["alternatives"][0].pop("predictions"), "$.alternatives[0].predictions", "required"),
])
def test_validation_errors_name_the_path(tmp_path, mutate, path, expected):
    document = json.loads(_plan().to_json())
    mutate(document)
    with pytest.raises(RecordError) as caught:
        load_record(Plan, _write(tmp_path, document))
    assert caught.value.path == path
    assert expected in caught.value.expected
    assert str(tmp_path / "plan.json") in str(caught.value)


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d.update(perturbation_batch_size=101), "exceeds batch_size 100"),
    (lambda d: d.update(staleness=2), "'staleness1' needs staleness 1"),
    (lambda d: d.update(feasible=False), "'staleness1' needs staleness 1 and feasible true"),
    (lambda d: d.update(mode="synchronous"), "'synchronous' needs staleness 0"),
    (lambda d: d.update(mode="non_blocking", staleness=0), "'non_blocking' needs staleness >= 1"),
    (lambda d: d["perturbation"].update(key="cpu/8t"), "does not match the device fields"),
    (lambda d: d["perturbation"].update(cores=[1, 2]), "2 cores for 4 threads"),
    (lambda d: d["alternatives"][0].update(perturbation_batch_size=500), "exceeds batch_size 100"),
])
def test_inconsistent_plans_are_rejected(tmp_path, mutate, message):
    document = json.loads(_plan().to_json())
    mutate(document)
    with pytest.raises(RecordError, match=message):
        load_record(Plan, _write(tmp_path, document))


def test_nan_is_rejected(tmp_path):
    text = _plan().to_json().replace('"margin": 0.05', '"margin": NaN')
    path = tmp_path / "plan.json"
    path.write_text(text)
    with pytest.raises(RecordError, match="finite"):
        load_record(Plan, path)


def test_perturbation_device_keys():
    assert PerturbationDevice(device="cuda:0", secondary_stream=True, key="cuda:0+stream").key == "cuda:0+stream"
    with pytest.raises(ValueError):
        PerturbationDevice(device="cuda:1", key="cuda:0")


def test_synchronous_and_non_blocking_plans_round_trip(tmp_path):
    slow = profile(affine("cuda:0", 0.01, 0.0001), affine("cpu/1t", 0.05, 0.004))
    for plan in (make_plan(slow, 100), make_plan(gpu_with_cpu(cores=1), 100)):
        dump_record(plan, tmp_path / "p.json")
        assert load_record(Plan, tmp_path / "p.json") == plan


def test_worker_cores():
    assert _plan().worker_cores == 4
    assert make_plan(gpu_with_cpu(cores=1), 100).worker_cores == 0


# ----------------------------------------------------------------------------- version 2

def test_the_version_1_fixture_reads_as_no_rule_and_no_floor_and_is_written_back_unchanged(tmp_path):
    plan = load_record(Plan, FIXTURE_V1)
    assert plan.rho_rule == NO_RHO_RULE and plan.rho_rule.kind == "none"
    assert plan.quality is None and plan.hiding is None and plan.trade is None and plan.profile_load is None
    assert plan.min_perturbation_batch_size == 1
    dump_record(plan, tmp_path / "again.json")
    assert (tmp_path / "again.json").read_text() == FIXTURE_V1.read_text()
    assert plan.content_hash() == load_record(Plan, tmp_path / "again.json").content_hash()


@pytest.mark.parametrize("field, value", [
    ("rho_rule", {"kind": "none", "exponent": 0.0, "max_factor": 1.0, "source": ""}),
    ("hiding", "full"),
    ("profile_load", {"busy": None, "summary": "not recorded"}),
])
def test_a_version_1_document_may_not_carry_version_2_fields(tmp_path, field, value):
    document = json.loads(FIXTURE_V1.read_text())
    document[field] = value
    with pytest.raises(RecordError, match=f"a version-1 plan has no {field}"):
        load_record(Plan, _write(tmp_path, document))


@pytest.mark.parametrize("field", ["quality", "hiding", "profile_load"])
def test_a_version_2_document_needs_its_fields(tmp_path, field):
    document = json.loads(_plan().to_json())
    del document[field]
    with pytest.raises(RecordError, match=f"a version-2 plan needs {field}"):
        load_record(Plan, _write(tmp_path, document))


def test_partial_and_synchronous_version_2_plans_round_trip(tmp_path):
    partial = make_plan(gpu_with_cpu(), 100, min_perturbation_fraction=0.25)  # floor 25 > the 17 that hides
    synchronous = make_plan(gpu_with_cpu(), 100, min_perturbation_fraction=1.0)
    assert (partial.hiding, synchronous.hiding) == ("partial", "none")
    for plan in (partial, synchronous):
        dump_record(plan, tmp_path / "p.json")
        loaded = load_record(Plan, tmp_path / "p.json")
        assert loaded == plan and loaded.content_hash() == plan.content_hash()
        assert json.loads((tmp_path / "p.json").read_text())["schema_version"] == 2


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d.update(hiding="partial"), "hiding 'partial' does not match mode 'staleness1' with feasible true"),
    (lambda d: d.update(hiding="none"), "hiding 'none' does not match"),
    (lambda d: d["alternatives"][0].update(hiding="stale"), "hiding 'stale' does not match"),
    (lambda d: d["quality"]["expected_gain"].update(value=None), "a gain bound 'estimate' needs a value"),
    (lambda d: d["quality"].update(min_perturbation_fraction=0), "greater than 0"),
    (lambda d: d["rho_rule"].update(max_factor=0.5), "greater than or equal to 1"),
])
def test_inconsistent_version_2_fields_are_rejected(tmp_path, mutate, message):
    document = json.loads(_plan().to_json())
    mutate(document)
    with pytest.raises(RecordError, match=message):
        load_record(Plan, _write(tmp_path, document))


def test_a_plan_chosen_by_measurement_gets_its_gain_and_a_note_below_the_floor():
    plan = make_plan(gpu_with_cpu(), 100, min_perturbation_fraction=0.25)  # floor b_p >= 25
    update = measured_choice_update(plan, 10, ("tuned",))
    assert update["hiding"] == "full" and update["trade"] is None
    assert update["quality"].expected_gain.perturbation_fraction == 0.1
    assert update["quality"].min_perturbation_batch_size == 25
    assert update["notes"][0] == "tuned" and "below the quality floor" in update["notes"][1]
    tuned = parse_record(Plan, json.loads(plan.model_copy(update=dict(
        perturbation_batch_size=10, feasible=True, **update)).to_json()))
    assert tuned.hiding == "full"
    assert measured_choice_update(load_record(Plan, FIXTURE_V1), 10, ("tuned",)) == {"notes": ("tuned",)}
