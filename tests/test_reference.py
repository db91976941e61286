"""rpg.ReferenceUpdate: when to reset π_ref ← π_θ."""

import pytest

import rpg


def test_every_k_steps():
    s = rpg.ReferenceUpdate(every=3)
    assert [s.step() for _ in range(7)] == [False, False, True, False, False, True, False]


def test_kl_target_with_moving_average():
    s = rpg.ReferenceUpdate(kl_target=0.1, ema=0.5)
    assert s.step(0.05) is False  # average 0.05
    assert s.step(0.12) is False  # 0.085
    assert s.step(0.2) is True  # 0.1425 > 0.1: reset, average restarts
    assert s.kl_average is None and s.steps_since_update == 0
    assert s.step(0.09) is False


def test_both_criteria():
    s = rpg.ReferenceUpdate(every=10, kl_target=1.0, ema=0.0)
    assert s.step(2.0) is True
    assert [s.step(0.0) for _ in range(10)][-1] is True


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(), "every"),
        (dict(every=0), "every"),
        (dict(kl_target=-1.0), "kl_target"),
        (dict(every=2, ema=1.0), "ema"),
    ],
)
def test_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        rpg.ReferenceUpdate(**kwargs)


def test_kl_needed_when_targeting():
    with pytest.raises(ValueError, match="needs the step's finite KL"):
        rpg.ReferenceUpdate(kl_target=0.1).step()
