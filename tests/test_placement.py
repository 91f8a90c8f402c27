"""Loaders beside their actors (cohort.execution.placement.LoaderPlacement), without Ray:
which node each loader task is given, from the actors' nodes and what was consumed."""

from __future__ import annotations

from collections import Counter

import pytest

from cohort.execution.placement import LoaderPlacement

pytestmark = pytest.mark.timeout(30)


def test_actors_on_one_node_leave_the_loaders_to_ray() -> None:
    assert LoaderPlacement(lambda: {}).choose() is None  # no actor has said where it runs
    assert LoaderPlacement(lambda: {"a": 3}).choose() is None
    assert LoaderPlacement(lambda: {"a": 1, "b": 0}).choose() is None  # b holds none


def test_loaders_follow_the_actors_per_node() -> None:
    placement = LoaderPlacement(lambda: {"a": 1, "b": 3})
    picks = Counter(placement.choose() for _ in range(8))
    assert picks == {"a": 2, "b": 6}  # unconsumed work per actor kept level: 2 each


def test_a_node_whose_actors_consume_gets_the_next_loaders() -> None:
    placement = LoaderPlacement(lambda: {"a": 1, "b": 1})
    assert [placement.choose() for _ in range(4)] == ["a", "b", "a", "b"]
    for _ in range(2):
        placement.consumed("b")  # b's actor is faster: both of its subjects are through
    assert [placement.choose() for _ in range(2)] == ["b", "b"]
    assert placement.choose() == "a"  # level again (2 unconsumed each): a is first


def test_the_actors_nodes_are_asked_again_after_the_refresh_interval() -> None:
    now = [0.0]
    asked = []
    layouts = [{"a": 1, "b": 1}, {"b": 1, "c": 1}]  # a was lost; its actor restarted on c

    def nodes() -> dict[str, int]:
        asked.append(now[0])
        return layouts[min(len(asked) - 1, 1)]

    placement = LoaderPlacement(nodes, refresh_s=2.0, clock=lambda: now[0])
    assert {placement.choose() for _ in range(4)} == {"a", "b"}
    now[0] = 1.9
    assert placement.choose() in {"a", "b"} and asked == [0.0]
    now[0] = 2.0
    assert placement.choose() == "c" and asked == [0.0, 2.0]  # c owes nothing yet
