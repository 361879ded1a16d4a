"""The tour's sections 2-4 (``python -m implicit``) check what they print."""

from __future__ import annotations

from implicit import __main__ as tour


def test_inverse_layer_section():
    assert tour.tour_inverse_layer() <= 1e-4  # float32, GMRES backward to tol 1e-6


def test_custom_root_section():
    assert tour.tour_custom_root() <= 1e-12


def test_anderson_section():
    assert tour.tour_anderson() <= 1e-9


def test_main_prints_every_section(capsys):
    assert tour.main([]) == 0
    out = capsys.readouterr().out
    for heading in ("1. The seed problem", "2. The seed's inverse layer", "3. scipy", "4. The"):
        assert heading in out
