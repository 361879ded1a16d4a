"""The tour's optimisation section checks what it prints."""

from __future__ import annotations

from implicit import _tour_optim as tour


def test_each_check_meets_its_reference():
    assert tour.ridge_hypergradient() <= 1e-10
    status, distance = tour.maximum_left()
    assert status == "converged" and distance <= 1e-6
    enzyme = tour.enzyme_fit()
    assert enzyme["exact"] <= 1e-6 and enzyme["gauss_newton"] >= 0.03
    assert tour.clipped_quadratic() <= 1e-12
    counts = tour.cubic_by_bracketing()
    assert all(error <= 1e-10 for _, error in counts.values())
    assert counts["chandrupatla"][0] < counts["bisection"][0]


def test_the_section_prints(capsys):
    tour.tour_optimisation("7. Optimisation layers")
    out = capsys.readouterr().out
    assert "7. Optimisation layers" in out and "Gauss–Newton only" in out
