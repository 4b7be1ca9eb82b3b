"""The peers commands end to end at a tiny size: files written, what they claim, clear errors.

No timing threshold: the checks are the bookkeeping that holds whatever the machine's load.
"""
from __future__ import annotations

import json
import sys

import pytest

from asam_tune.bench import peers, peers_remedies, peers_rho

pytestmark = pytest.mark.timeout(300)


def _quick(tmp_path, *extra):
    out = tmp_path / "out"
    argv = ["--workload", "mnist1d-cnn", "--quick", "--output", str(out), *extra]
    return out, peers.main(argv)


def test_quick_run_writes_json_markdown_and_plots(tmp_path):
    out, code = _quick(tmp_path, "--methods", "sgd,sam,po-sam,asam-1/4", "--timing-steps", "0")
    assert code == 0
    result = json.loads((out / "peers.json").read_text())
    assert set(result["methods"]) == {"sgd", "sam", "po-sam", "asam-1/4"}
    assert result["commit"] and result["machine"]["cpu"] and result["load_average"]["start"]
    for name, row in result["methods"].items():
        assert len(row["test_accuracy"]) == 1 and 0 <= row["test_mean"] <= 1
        assert row["rho"] == (None if name == "sgd" else 0.1)
    assert result["methods"]["asam-1/4"]["perturbation_batch_size"] == 25
    assert result["methods"]["asam-1/4"]["predicted_step_s"] > 0  # the shipped mnist1d profile
    for png in ("accuracy-vs-time.png", "accuracy-vs-bp.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    markdown = (out / "peers.md").read_text()
    assert "| `asam-1/4` (b_p=25) |" in markdown and "never the test split" in markdown
    lines = (out / "runs.jsonl").read_text().splitlines()
    assert len(lines) == 4
    # A second invocation reuses every stored run: nothing is trained again.
    _, code = _quick(tmp_path, "--methods", "sgd,sam,po-sam,asam-1/4", "--timing-steps", "0", "--no-plots")
    assert code == 0 and len((out / "runs.jsonl").read_text().splitlines()) == 4


@pytest.mark.process
def test_quick_run_times_the_asynchronous_method_with_a_real_worker(tmp_path):
    from asam_tune.fingerprint import usable_core_ids

    if len(usable_core_ids()) < 2:
        pytest.skip("needs two usable cores")
    out, code = _quick(tmp_path, "--methods", "sgd,asam-1/4", "--timing-steps", "3", "--no-plots")
    assert code == 0
    timing = json.loads((out / "peers.json").read_text())["timing"]
    assert timing["methods"]["asam-1/4"]["worker"] is True
    assert timing["methods"]["sgd"]["worker"] is False
    assert timing["methods"]["asam-1/4"]["steps"] == 3


@pytest.mark.parametrize(("module", "extra", "methods"), [
    ("pytorch_optimizer", "peers", "sgd,looksam-k5"),
    ("matplotlib", "plot", "sgd"),
])
def test_missing_extra_says_what_to_install_in_one_line(tmp_path, monkeypatch, capsys, module, extra, methods):
    monkeypatch.setitem(sys.modules, module, None)  # import fails as if not installed
    _, code = _quick(tmp_path, "--methods", methods)
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.count("\n") == 0 and f'pip install "asam-tune[{extra}]"' in err
    assert not (tmp_path / "out" / "runs.jsonl").exists()  # nothing trained


def test_bad_method_is_a_one_line_error(tmp_path, capsys):
    _, code = _quick(tmp_path, "--methods", "sgd,asam-2")
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and "asam-2" in err


def _synthetic_result(run_store: str) -> dict:
    """A peers result as peers.main writes it, with the fields the rho study and ranking read."""
    rows, selections = {}, {}
    for name, kind, fraction, rho, acc in (("sgd", "sgd", 0.0, None, 0.70), ("sam", "sam", 1.0, 0.4, 0.90),
                                           ("asam-1/4", "asam", 0.25, 0.6, 0.88), ("asam-1/16", "asam", 0.0625, 0.8, 0.86),
                                           ("looksam-k5", "looksam", 1.0, 0.4, 0.75)):
        rows[name] = {"kind": kind, "asynchronous": kind == "asam", "rho": rho, "ascent_fraction": fraction,
                      "perturbation_batch_size": max(1, round(100 * fraction)) if kind != "sgd" else None,
                      "main_ascent_samples": 0, "test_accuracy": [acc], "test_mean": acc, "test_sd": 0.0,
                      "gain_fraction": (acc - 0.70) / 0.20, "step_time_median_s": 0.01 if kind == "sgd" else 0.012,
                      "test_curve_mean": [acc * 0.9, acc]}
        if rho is not None:
            selections[name] = {"rho": rho, "val_scores": {str(rho / 1.25): acc - 0.02, str(rho): acc,
                                                           str(rho * 1.25): acc - 0.02}}
    return {"task": "mnist1d-cnn", "methods": rows, "selections": selections, "sgd_test_mean": 0.70,
            "sam_test_mean": 0.90, "batch_size": 100, "forward_backward_share": 0.95, "steps_per_epoch": 32,
            "epochs": 1, "seeds": 1, "run_store": run_store}


def test_rho_study_fits_and_ranking_reports_from_synthetic_results(tmp_path, capsys):
    peers_json = tmp_path / "peers.json"
    peers_json.write_text(json.dumps(_synthetic_result(str(tmp_path / "runs.jsonl"))))
    assert peers_rho.main(["--input", str(peers_json), "--output", str(tmp_path / "rho"), "--no-check"]) == 0
    study = json.loads((tmp_path / "rho" / "rho.json").read_text())
    assert [round(p["factor"], 2) for p in study["points"]] == [1.5, 2.0]
    assert study["rule"]["exponent"] > 0 and (tmp_path / "rho" / "rho-vs-bp.png").exists()
    assert peers_remedies.main(["--input", str(peers_json), "--rho", str(tmp_path / "rho" / "rho.json"),
                                "--output", str(tmp_path / "rem")]) == 0
    report = json.loads((tmp_path / "rem" / "remedies.json").read_text())
    ranking = report["workloads"]["mnist1d-cnn"]["ranking"]
    assert ranking[0]["keeps_gain"] and ranking[0]["cost"] == min(r["cost"] for r in ranking if r["keeps_gain"])
    assert "not measured" in report["workloads"]["mnist1d-cnn"]["targets"]["verdict"]
    capsys.readouterr()


def test_rho_study_with_too_few_points_is_a_one_line_error(tmp_path, capsys):
    result = _synthetic_result(str(tmp_path / "runs.jsonl"))
    del result["methods"]["asam-1/16"]
    (tmp_path / "peers.json").write_text(json.dumps(result))
    code = peers_rho.main(["--input", str(tmp_path / "peers.json"), "--output", str(tmp_path / "rho"), "--no-check"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and "cannot fit" in err
