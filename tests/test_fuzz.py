"""The guard against a hand-written reference on random module trees (see fuzz_guard.py).

CI runs a bounded number of examples; ``python benchmarks/fuzz_guard.py --examples N``
runs as many as you like.
"""

from __future__ import annotations

from fuzz_guard import Recipe, check, recipes
from hypothesis import HealthCheck, given, settings


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(recipe=recipes())
def test_the_guard_equals_freezing_by_hand_on_random_models(recipe):
    check(recipe)


def test_a_known_case_is_compared_not_refused():
    recipe = Recipe(
        seed=3,
        tree=(0, (True, (0, 1, 2)), (False, (1, 4))),
        shared=True,
        adapter_host=1,
        reader=4,
        targets=("1", "2"),
        trainable=("body.0",),
        x_requires_grad=True,
    )
    assert check(recipe) is True
