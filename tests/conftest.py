"""Shared pytest fixtures."""

import pytest
from mosquitto_broker import MosquittoBroker, find_mosquitto


@pytest.fixture
def mosquitto(tmp_path):
    """A running mosquitto on 127.0.0.1 (see tests/mosquitto_broker.py), always
    stopped afterwards; ``mosquitto.port`` is its port."""
    if find_mosquitto() is None:
        pytest.fail("mosquitto is not installed: sudo apt-get install mosquitto")
    broker = MosquittoBroker(tmp_path / "mosquitto")
    try:
        broker.start()
        yield broker
    finally:
        broker.close()


@pytest.fixture(scope="session")
def basicmotions_model(tmp_path_factory):
    """The default BasicMotions model folder, built once per test session by
    ``edgernn build`` exactly as a user runs it (train, export, quantize, verify)."""
    pytest.importorskip("tensorflow")
    from edgernn.cli import main

    out = tmp_path_factory.mktemp("models") / "basicmotions"
    assert main(["build", "--data", "basicmotions", "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="session")
def basicmotions_test():
    """The BasicMotions test split shipped with edgernn."""
    from edgernn.datasets import load_builtin

    return load_builtin("basicmotions")[1]


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False,
                     help="also run the long variants marked slow (soak, many replugs)")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow"):
        return
    skip_slow = pytest.mark.skip(reason="long variant; run with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip_slow)
