"""A gateway process prepares itself at start-up: the token encoder is loaded
and start-up's objects are frozen out of garbage collection, with the
configured thresholds (conversations/gateway/warmup.py)."""

import gc

import pytest

from conversations.gateway import tokens, warmup


@pytest.fixture
def restore_gc():
    threshold = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*threshold)


def test_start_up_loads_the_encoder_and_freezes_what_exists(settings, restore_gc):
    settings.GATEWAY = {**settings.GATEWAY, "GC_THRESHOLD": (12_345, 7, 9)}
    tokens._encoding.cache_clear()
    gc.unfreeze()
    survivor = ["made before start-up", []]  # a list: always tracked by the collector

    warmup.prepare_process()

    assert tokens._encoding.cache_info().currsize == 1  # the first request finds it loaded
    assert gc.get_threshold() == (12_345, 7, 9)
    assert gc.get_freeze_count() > 0
    assert not any(obj is survivor for obj in gc.get_objects())  # frozen: collections skip it
    made_after = ["made by a request", []]
    assert any(obj is made_after for obj in gc.get_objects())  # still collected as usual


def test_an_empty_threshold_keeps_the_interpreters_own(settings, restore_gc):
    settings.GATEWAY = {**settings.GATEWAY, "GC_THRESHOLD": ()}
    before = gc.get_threshold()
    warmup.prepare_process()
    assert gc.get_threshold() == before
