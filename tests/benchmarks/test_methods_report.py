"""benchmarks/methods_report.py: its controls and intervals against closed forms, and one small run on the organism
where rotation by 0 degrees (the identity) must read exactly as the unsteered model."""
import importlib.util
import sys

import pytest
import torch
from helpers import paths

_spec = importlib.util.spec_from_file_location("methods_report", paths.REPO / "benchmarks" / "methods_report.py")
report_script = sys.modules.setdefault("methods_report", importlib.util.module_from_spec(_spec))
_spec.loader.exec_module(report_script)


def test_the_random_control_keeps_method_strength_sites_and_norms():
    from gavel.steering.selective.intervene import PlaneIntervention

    g = torch.Generator().manual_seed(0)
    plane, _ = torch.linalg.qr(torch.randn(12, 2, generator=g))
    vectors = torch.randn(3, 12, generator=g) * torch.tensor([[1.0], [5.0], [0.2]])
    fitted = PlaneIntervention("add", ("a", "b", "c"), 0.5, plane, vectors)
    control = report_script.random_control(fitted, seed=3)
    assert (control.method, control.sites, control.strength) == ("add", ("a", "b", "c"), 0.5)
    torch.testing.assert_close(control.plane.T @ control.plane, torch.eye(2), atol=1e-6, rtol=0)
    torch.testing.assert_close(control.vectors.norm(dim=-1), vectors.norm(dim=-1))
    assert abs(float(control.vectors[0] @ vectors[0])) < 0.99 * float(vectors[0].norm() ** 2)
    torch.testing.assert_close(report_script.random_control(fitted, seed=3).plane, control.plane)


def test_halves_are_disjoint_and_seeded_and_rates_pool_the_seeds():
    fit, held = report_script.halves(list(range(21)), seed=4)
    assert sorted(fit + held) == list(range(21)) and len(fit) == 10
    assert (fit, held) == report_script.halves(list(range(21)), seed=4) != report_script.halves(list(range(21)), 5)
    rate = report_script.rate([[True, False, False, False], [True, True]], resamples=200, seed=0)
    assert rate.value == pytest.approx(3 / 6) and rate.per_seed == [0.25, 1.0]
    assert rate.low <= rate.value <= rate.high
    constant = report_script.rate([[True] * 5, [True] * 3], resamples=50, seed=0)
    assert (constant.low, constant.high) == (1.0, 1.0)


@pytest.mark.parametrize("reply, expected, ok", [("12 + 7 = 19.", "19", True), ("The answer is 8 apples", "8", True),
                                                 ("19\nor maybe 20", "19", True), ("It is 1,200.", "1200", True),
                                                 ("I think 18", "19", False), ("", "1", False)])
def test_exact_match_reads_the_last_number_of_the_first_line(reply, expected, ok):
    assert report_script.last_number(reply, expected) is ok


def test_a_small_run_on_the_organism(organism, tmp_path):
    """Rotation by 0 degrees is the identity: its row equals the unsteered row, seed by seed."""
    report = report_script.main(["--model", "builtin:organism", "--seeds", "2", "--method", "rotate:0",
                                 "--judge", "phrases", "--max-new-tokens", "12", "--utility-tokens", "24",
                                 "--resamples", "50", "--out-json", str(tmp_path / "r.json"),
                                 "--out-md", str(tmp_path / "r.md")])
    rows = {(r.method, r.control): r for r in report.rows}
    plain, rotated = rows[("unsteered", False)], rows[("rotate", False)]
    for field in ("refusal_harmful", "over_refusal_benign", "degenerate_harmful", "utility"):
        assert getattr(rotated, field).per_seed == getattr(plain, field).per_seed
    assert plain.refusal_harmful.value == 1.0 and plain.over_refusal_benign.value == 0.0
    assert report.held_out == {"harmful": 10, "benign": 20, "utility": 25} and len(report.layers) == 2
    again = report_script.MethodsReport.model_validate_json((tmp_path / "r.json").read_text())
    assert again.model_dump_json() == report.model_dump_json()
    assert "| rotate | 0 | random |" in (tmp_path / "r.md").read_text()
