"""Spare interpreters are on by default for a run that can restart: `[failover] warm_spares`
(default true, only with max_restarts > 0), carried to the nodes as AVA_WARM_SPARES=1 in the
spec's env; a recipe's own [env] AVA_WARM_SPARES overrides both."""

from __future__ import annotations

from pathlib import Path

import pytest

from ava.agent import warm
from ava.config import Node, Recipe, parse_recipe
from ava.errors import ConfigError
from ava.launch import Route
from ava.supervisor import plan_attempt, spares_wanted, with_spares

REPO = Path(__file__).resolve().parents[2]
BASE = """name = "steps"
[run]
script = "train.py"
"""


def recipe(text: str = "", *overrides: str) -> Recipe:
    return parse_recipe(BASE + text, "recipe.toml", ".", list(overrides))


def test_a_run_that_can_restart_keeps_spares_by_default() -> None:
    plain = recipe()
    assert plain.failover.warm_spares and plain.failover.max_restarts > 0
    assert spares_wanted(plain)
    assert with_spares(plain).env[warm.ENABLE] == "1"
    assert warm.ENABLE not in plain.env  # the recipe itself (and its record) is left as it was


def test_a_run_that_cannot_restart_or_says_no_starts_no_spare() -> None:
    echo = (REPO / "tests/data/recipes/echo/recipe.toml").read_text()
    for text in (echo, "[failover]\nmax_restarts = 0\n", "[failover]\nwarm_spares = false\n"):
        parsed = parse_recipe(text if text is echo else BASE + text, "recipe.toml", ".")
        assert not spares_wanted(parsed)
        assert warm.ENABLE not in with_spares(parsed).env
    assert not spares_wanted(recipe("", "failover.warm_spares=false"))


def test_the_env_variable_overrides_the_recipe_key() -> None:
    assert not spares_wanted(recipe('[env]\nAVA_WARM_SPARES = "0"\n'))
    assert with_spares(recipe('[env]\nAVA_WARM_SPARES = "0"\n')).env[warm.ENABLE] == "0"
    forced = recipe('[env]\nAVA_WARM_SPARES = "1"\n[failover]\nwarm_spares = false\n')
    assert spares_wanted(forced) and with_spares(forced).env[warm.ENABLE] == "1"


def test_a_bad_warm_spares_is_one_line_naming_the_key() -> None:
    with pytest.raises(ConfigError) as raised:
        recipe('[failover]\nwarm_spares = "yes"\n')
    message = str(raised.value)
    assert "failover.warm_spares" in message and "recipe.toml" in message and "\n" not in message


def test_every_node_of_a_planned_attempt_gets_the_spares_env() -> None:
    nodes = [Node(name="n1", host="10.0.0.1"), Node(name="n2", host="10.0.0.2")]
    routes = {n.name: Route(n.host or "", "eth0", "/root", 2) for n in nodes}
    plain = recipe("[resources]\nnodes = 2\n")
    launches, _, _ = plan_attempt(plain, nodes, "steps-1", 1, "code", "runtime", {}, found=(routes, 29500))
    assert all(launch.spec.env.get(warm.ENABLE) == "1" for launch in launches)
    echo = recipe("[resources]\nnodes = 2\n[failover]\nmax_restarts = 0\n")
    launches, _, _ = plan_attempt(echo, nodes, "steps-1", 1, "code", "runtime", {}, found=(routes, 29500))
    assert all(warm.ENABLE not in launch.spec.env for launch in launches)
