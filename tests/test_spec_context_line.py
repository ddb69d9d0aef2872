"""The adaptive controller's plain-step line against the context (eyas/spec/context_line.py)."""
import pytest

from eyas.spec.context_line import ContextLine


def test_no_line_before_any_sample():
    line = ContextLine()
    assert line.fit() is None and line.at(1000) is None
    line.add(0, 0.1)  # a step with no context says nothing about the slope
    line.add(1000, 0.0)
    assert line.at(1000) is None


def test_slope_ignores_stalled_steps():
    line = ContextLine()
    for i, ctx in enumerate(range(1000, 3001, 100)):  # 20 ms + 20 us a token; every 5th step stalls
        line.add(ctx, 0.020 + 2e-5 * ctx + (0.2 if i % 5 == 3 else 0.0))
    assert line.fit()[2] == pytest.approx(2e-5, rel=0.05)
    assert line.at(1500) == pytest.approx(0.050, rel=0.05)
    assert line.at(4000) == pytest.approx(0.100, rel=0.05)  # extrapolates along the same line


def test_one_bin_is_flat():
    line = ContextLine()
    for t in (0.10, 0.30, 0.11):
        line.add(5000, t)
    assert line.fit()[2] == 0 and line.at(100) == line.at(10**6) == pytest.approx(0.11)


def test_time_grows_at_most_in_proportion_to_the_context():
    # times that grow faster than the context (a negative fixed part) are not physical: the slope
    # is cut to the line through the origin, so the line stays positive at small contexts
    line = ContextLine()
    for ctx in range(2000, 4001, 200):
        line.add(ctx, 4e-5 * (ctx - 1500))
    xc, level, slope = line.fit()
    assert slope == pytest.approx(level / xc)
    assert line.at(500) == pytest.approx(level * 500 / xc)
    assert line.at(1) > 0


def test_a_bin_follows_the_machine_when_the_context_comes_back():
    line = ContextLine(per_bin=3)
    for _ in range(3):  # a slow spell at 1000 tokens
        line.add(1000, 0.3)
    line.add(2000, 0.2)
    assert sorted(line.points()) == [(1000, 0.3), (2000, 0.2)]
    assert line.fit()[2] == 0  # time does not fall with the context: flat, not a negative slope
    for _ in range(2):  # back to normal: the bin's point is the recent samples' median
        line.add(1000, 0.1)
    assert sorted(line.points()) == [(1000, 0.1), (2000, 0.2)]
    assert line.at(1000) == pytest.approx(0.1) and line.at(2000) == pytest.approx(0.2)
