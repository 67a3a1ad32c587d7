"""Service-time estimates (orchd/core/eta.py)."""

from __future__ import annotations

import pytest

from orchd.core.eta import ServiceTime


def test_prior_until_first_observation() -> None:
    st = ServiceTime(prior_ms=1000.0, alpha=0.2)
    assert st.mean_ms == 1000.0
    assert st.samples == 0
    st.observe(400.0)
    # The prior is replaced, not averaged in.
    assert st.mean_ms == 400.0
    assert st.samples == 1


def test_ewma_after_first_observation() -> None:
    st = ServiceTime(prior_ms=5000.0, alpha=0.2)
    st.observe(400.0)
    st.observe(600.0)
    assert st.mean_ms == pytest.approx(440.0)
    st.observe(440.0)
    assert st.mean_ms == pytest.approx(440.0)
    st.observe(0.0)
    assert st.mean_ms == pytest.approx(352.0)
    assert st.samples == 4


def test_alpha_one_tracks_last() -> None:
    st = ServiceTime(alpha=1.0)
    for ms in (10.0, 70.0, 30.0):
        st.observe(ms)
    assert st.mean_ms == 30.0


def test_predicted_start_zero_when_a_slot_is_free() -> None:
    st = ServiceTime(prior_ms=1000.0)
    assert st.predicted_start_ms(ahead=0, total_slots=4, free_slots=1) == 0
    assert st.predicted_start_ms(ahead=2, total_slots=4, free_slots=3) == 0


def test_predicted_start_waves() -> None:
    st = ServiceTime(prior_ms=1000.0)
    # No free slot: one full service time for the first wave of 4.
    assert st.predicted_start_ms(ahead=0, total_slots=4, free_slots=0) == 1000
    assert st.predicted_start_ms(ahead=3, total_slots=4, free_slots=0) == 1000
    assert st.predicted_start_ms(ahead=4, total_slots=4, free_slots=0) == 2000
    assert st.predicted_start_ms(ahead=9, total_slots=4, free_slots=0) == 3000
    # One slot free takes the head; the rest wait in waves.
    assert st.predicted_start_ms(ahead=1, total_slots=4, free_slots=1) == 1000
    assert st.predicted_start_ms(ahead=5, total_slots=4, free_slots=1) == 2000
    st.observe(250.0)
    assert st.predicted_start_ms(ahead=5, total_slots=4, free_slots=1) == 500


def test_predicted_start_with_no_live_slots() -> None:
    st = ServiceTime(prior_ms=300.0)
    assert st.predicted_start_ms(ahead=0, total_slots=0, free_slots=0) == 300
    assert st.predicted_start_ms(ahead=2, total_slots=0, free_slots=0) == 900


def test_predicted_start_is_int() -> None:
    st = ServiceTime(prior_ms=333.7)
    v = st.predicted_start_ms(ahead=0, total_slots=1, free_slots=0)
    assert isinstance(v, int) and v == 333


def test_slot_interval_ms() -> None:
    st = ServiceTime(prior_ms=1000.0)
    assert st.slot_interval_ms(4) == 250
    assert st.slot_interval_ms(1) == 1000
    assert st.slot_interval_ms(0) == 1000
    assert st.slot_interval_ms(3) == 333
    st.observe(0.5)
    assert st.slot_interval_ms(8) == 1  # never zero
