"""Fixtures of the end-to-end tests: real registries and gateways, started once per session."""

from collections.abc import Iterator

import pytest

from tests.support import world as worlds
from tests.support.world import World


@pytest.fixture(scope="session")
def pull_world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    with worlds.pull_world(tmp_path_factory.mktemp("pull")) as world:
        yield world


@pytest.fixture
def fresh(pull_world: World) -> World:
    """The shared pull world, with each mirror's record of requests started anew for this test."""
    pull_world.a.mark()
    pull_world.b.mark()
    return pull_world
