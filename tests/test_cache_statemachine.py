"""Hypothesis state machines that check the cache against plain models, with a fake clock.

``CacheMachine`` checks every operation against a dict of ``key -> (value, expires)`` kept in
step by the ``on_evict`` reports: what ``get`` returns, that every report is legal (right
value, right cause at the right time), that ``len`` and ``statistics()`` agree with the model.
``SieveMachine`` checks, without expiry, that the entries evicted are those that a textbook
SIEVE evicts; ``WeightedSieveMachine`` does the same with weights (evict until the new entry
fits) and checks the weight in the statistics. ``CacheMachine`` also covers the mapping face
and ``set_many``/``get_many``.
"""

from __future__ import annotations

import itertools
from typing import Any

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from darwin_metrics._cache import Cache, CacheStatistics, EvictionCause

KEYS = st.sampled_from("abcde")
TTL = 10.0


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class CacheMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.clock = FakeClock()
        self.reports: list[tuple[str, int, EvictionCause]] = []
        self.values = itertools.count()
        self.model: dict[str, tuple[int, float]] = {}
        self.hits = self.misses = self.sets = self.evictions = self.expirations = 0
        self.removals = self.replacements = self.loads = 0
        self.cache: Cache[str, int] = Cache(TTL)
        self.maxsize: int | None = None

    @initialize(maxsize=st.none() | st.integers(min_value=1, max_value=4))
    def make_cache(self, maxsize: int | None) -> None:
        self.maxsize = maxsize
        self.cache = Cache(
            TTL,
            maxsize=maxsize,
            clock=self.clock,
            on_evict=lambda key, value, cause: self.reports.append((key, value, cause)),
        )

    def live(self, key: str) -> bool:
        return key in self.model and self.clock.now < self.model[key][1]

    def take_reports(self, operation: str) -> list[tuple[str, EvictionCause]]:
        """Check the reports of one operation and apply them to the model."""
        taken = []
        for key, value, cause in self.reports:
            assert key in self.model, f"{operation}: report of a key not held: {key!r}"
            held, expires = self.model.pop(key)
            assert value == held, f"{operation}: {key!r} reported with a stale value"
            expired = expires <= self.clock.now
            assert expired == (cause is EvictionCause.EXPIRED), (operation, key, cause)
            if cause is EvictionCause.EXPIRED:
                self.expirations += 1
            elif cause is EvictionCause.SIZE:
                self.evictions += 1
            elif cause is EvictionCause.REMOVED:
                self.removals += 1
            else:
                self.replacements += 1
            taken.append((key, cause))
        self.reports.clear()
        return taken

    @rule(key=KEYS, ttl=st.sampled_from([None, 0.5, 1.0, 5.0, 20.0]))
    def set(self, key: str, ttl: float | None) -> None:
        value = next(self.values)
        was_live = self.live(key)
        was_held = key in self.model
        held_before = len(self.model)
        self.cache.set(key, value, ttl=ttl)
        self.sets += 1
        taken = self.take_reports("set")
        causes = [cause for _, cause in taken]
        if was_live:
            assert taken == [(key, EvictionCause.REPLACED)]
        elif was_held:
            assert taken == [(key, EvictionCause.EXPIRED)]
        else:
            assert EvictionCause.REPLACED not in causes
            assert EvictionCause.REMOVED not in causes
            assert causes.count(EvictionCause.SIZE) <= 1
            if EvictionCause.SIZE in causes:
                # Only to make room: the cache was full of live entries.
                assert self.maxsize is not None
                assert held_before - causes.count(EvictionCause.EXPIRED) == self.maxsize
        self.model[key] = (value, self.clock.now + (TTL if ttl is None else ttl))

    @rule(key=KEYS)
    def get(self, key: str) -> None:
        expected = self.model[key][0] if self.live(key) else None
        was_held = key in self.model
        assert self.cache.get(key) == expected
        taken = self.take_reports("get")
        if expected is None:
            self.misses += 1
            assert taken == ([(key, EvictionCause.EXPIRED)] if was_held else [])
        else:
            self.hits += 1
            assert taken == []

    @rule(key=KEYS)
    def contains(self, key: str) -> None:
        expected = self.live(key)
        was_held = key in self.model
        assert (key in self.cache) is expected
        taken = self.take_reports("contains")
        assert taken == ([(key, EvictionCause.EXPIRED)] if was_held and not expected else [])

    @rule(key=KEYS)
    def remove(self, key: str) -> None:
        expected = self.live(key)
        was_held = key in self.model
        assert self.cache.remove(key) is expected
        taken = self.take_reports("remove")
        if was_held:
            cause = EvictionCause.REMOVED if expected else EvictionCause.EXPIRED
            assert taken == [(key, cause)]
        else:
            assert taken == []

    @rule(key=KEYS)
    def get_or_set(self, key: str) -> None:
        made = []

        def make() -> int:
            made.append(next(self.values))
            return made[-1]

        expected = self.model[key][0] if self.live(key) else None
        result = self.cache.get_or_set(key, make)
        self.take_reports("get_or_set")
        if expected is None:
            self.misses += 1
            self.sets += 1
            self.loads += 1
            assert made == [result]
            self.model[key] = (result, self.clock.now + TTL)
        else:
            self.hits += 1
            assert made == []
            assert result == expected

    @rule(seconds=st.sampled_from([0.25, 0.5, 1.0, 5.0, 10.0]))
    def advance(self, seconds: float) -> None:
        self.clock.now += seconds

    @precondition(lambda self: any(self.live(key) for key in self.model))
    @rule(data=st.data(), offset=st.sampled_from([-1e-6, 0.0, 1e-6]))
    def advance_to_an_expiry(self, data: st.DataObject, offset: float) -> None:
        """Move the clock to just before, exactly at, or just after a live entry's expiry."""
        key = data.draw(st.sampled_from(sorted(key for key in self.model if self.live(key))))
        self.clock.now = max(self.clock.now, self.model[key][1] + offset)

    @rule()
    def clear_expired(self) -> None:
        expired = {key for key in self.model if not self.live(key)}
        assert self.cache.clear_expired() == len(expired)
        taken = self.take_reports("clear_expired")
        assert {key for key, _ in taken} == expired

    @precondition(lambda self: len(self.model) > 0)
    @rule()
    def clear(self) -> None:
        self.cache.clear()
        self.take_reports("clear")
        assert self.model == {}

    @rule(key=KEYS)
    def getitem(self, key: str) -> None:
        expected = self.model[key][0] if self.live(key) else None
        was_held = key in self.model
        if expected is None:
            with pytest.raises(KeyError):
                self.cache[key]
            self.misses += 1
        else:
            assert self.cache[key] == expected
            self.hits += 1
        taken = self.take_reports("getitem")
        assert taken == ([(key, EvictionCause.EXPIRED)] if was_held and expected is None else [])

    @rule(key=KEYS, use_del=st.booleans())
    def pop(self, key: str, use_del: bool) -> None:
        expected = self.model[key][0] if self.live(key) else None
        was_held = key in self.model
        if use_del:
            if expected is None:
                with pytest.raises(KeyError):
                    del self.cache[key]
            else:
                del self.cache[key]
        else:
            assert self.cache.pop(key, None) == expected
        taken = self.take_reports("pop")
        if was_held:
            cause = EvictionCause.REMOVED if expected is not None else EvictionCause.EXPIRED
            assert taken == [(key, cause)]
        else:
            assert taken == []

    @rule(keys=st.lists(KEYS, unique=True, max_size=4), ttl=st.sampled_from([None, 1.0, 5.0]))
    def set_many(self, keys: list[str], ttl: float | None) -> None:
        batch = {key: next(self.values) for key in keys}
        self.cache.set_many(batch, ttl=ttl)
        self.sets += len(batch)
        evicted_from_batch = set()
        for key, value, cause in self.reports:
            if key in self.model and self.model[key][0] == value:
                _, expires = self.model.pop(key)
                expired = expires <= self.clock.now
                assert expired == (cause is EvictionCause.EXPIRED), ("set_many", key, cause)
                if cause is EvictionCause.EXPIRED:
                    self.expirations += 1
                elif cause is EvictionCause.SIZE:
                    self.evictions += 1
                else:
                    assert cause is EvictionCause.REPLACED
                    self.replacements += 1
            else:
                # A value of this very batch, evicted to make room for a later one.
                assert batch.get(key) == value, ("set_many", key, value, cause)
                assert cause is EvictionCause.SIZE
                self.evictions += 1
                evicted_from_batch.add(key)
        self.reports.clear()
        expires = self.clock.now + (TTL if ttl is None else ttl)
        for key, value in batch.items():
            if key not in evicted_from_batch:
                self.model[key] = (value, expires)

    @rule(keys=st.lists(KEYS, max_size=5))
    def get_many(self, keys: list[str]) -> None:
        expected = {key: self.model[key][0] for key in keys if self.live(key)}
        assert self.cache.get_many(keys) == expected
        self.hits += sum(key in expected for key in keys)
        self.misses += sum(key not in expected for key in keys)
        self.take_reports("get_many")

    @invariant()
    def agrees_with_the_model(self) -> None:
        assert len(self.cache) == len(self.model)
        if self.maxsize is not None:
            assert len(self.cache) <= self.maxsize
        lookups = self.hits + self.misses
        stats = self.cache.statistics()
        assert stats == CacheStatistics(
            hits=self.hits,
            misses=self.misses,
            sets=self.sets,
            evictions=self.evictions,
            expirations=self.expirations,
            removals=self.removals,
            replacements=self.replacements,
            loads=self.loads,
            load_failures=0,
            joined=0,
            refreshes=0,
            refresh_failures=0,
            stale_served=0,
            load_duration=stats.load_duration,
            size=len(self.model),
            maxsize=self.maxsize,
            weight=len(self.model),
            max_weight=None,
            hit_ratio=self.hits / lookups if lookups else 0.0,
        )
        assert stats.load_duration.count == self.loads
        live = {key: value for key, (value, _) in self.model.items() if self.live(key)}
        assert sorted(self.cache.items()) == sorted(live.items())
        assert sorted(self.cache.keys()) == sorted(self.cache) == sorted(live)
        assert sorted(self.cache.values()) == sorted(live.values())


class ReferenceSieve:
    """SIEVE as the paper describes it: a FIFO queue, visited bits, and a hand."""

    def __init__(self, maxsize: int) -> None:
        self.maxsize = maxsize
        self.queue: list[list[Any]] = []  # [key, visited], oldest first
        self.hand = 0

    def index(self, key: str) -> int:
        return next(i for i, (k, _) in enumerate(self.queue) if k == key)

    def visit(self, key: str) -> None:
        self.queue[self.index(key)][1] = True

    def remove(self, key: str) -> None:
        index = self.index(key)
        del self.queue[index]
        if index < self.hand:
            self.hand -= 1

    def insert(self, key: str) -> str | None:
        """Insert a new key; return the key evicted for it, if any."""
        evicted = None
        if len(self.queue) >= self.maxsize:
            while True:
                if self.hand >= len(self.queue):
                    self.hand = 0
                entry = self.queue[self.hand]
                if entry[1]:
                    entry[1] = False
                    self.hand += 1
                    continue
                evicted = entry[0]
                del self.queue[self.hand]
                break
        self.queue.append([key, False])
        return evicted


class WeightedReferenceSieve(ReferenceSieve):
    """The same SIEVE, evicting until the total weight fits; a replaced key is passed over."""

    def __init__(self, max_weight: int) -> None:
        super().__init__(maxsize=1 << 30)
        self.max_weight = max_weight
        self.weights: dict[str, int] = {}

    def _evict(self, protect: str | None) -> str:
        while True:
            if self.hand >= len(self.queue):
                self.hand = 0
            entry = self.queue[self.hand]
            if entry[0] == protect:
                self.hand += 1
                continue
            if entry[1]:
                entry[1] = False
                self.hand += 1
                continue
            del self.queue[self.hand]
            del self.weights[entry[0]]
            return str(entry[0])

    def put(self, key: str, weight: int) -> list[str]:
        """Store ``key`` with ``weight``; return the keys evicted for it, in order."""
        evicted = []
        if key in self.weights:
            self.visit(key)
            self.weights[key] = weight
            while sum(self.weights.values()) > self.max_weight:
                evicted.append(self._evict(protect=key))
            return evicted
        while sum(self.weights.values()) + weight > self.max_weight:
            evicted.append(self._evict(protect=None))
        self.queue.append([key, False])
        self.weights[key] = weight
        return evicted

    def remove(self, key: str) -> None:
        super().remove(key)
        del self.weights[key]


class SieveMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.reports: list[tuple[str, EvictionCause]] = []
        self.cache: Cache[str, int] = Cache(TTL)
        self.reference = ReferenceSieve(1)

    @initialize(maxsize=st.integers(min_value=1, max_value=5))
    def make_cache(self, maxsize: int) -> None:
        # The clock never moves: nothing expires, every departure is the policy's choice.
        self.cache = Cache(
            TTL,
            maxsize=maxsize,
            clock=lambda: 0.0,
            on_evict=lambda key, value, cause: self.reports.append((key, cause)),
        )
        self.reference = ReferenceSieve(maxsize)

    @rule(key=KEYS)
    def set(self, key: str) -> None:
        self.cache.set(key, 0)
        if any(k == key for k, _ in self.reference.queue):
            # A replacement keeps its place in the queue and counts as a visit.
            self.reference.visit(key)
            assert self.reports == [(key, EvictionCause.REPLACED)]
        else:
            evicted = self.reference.insert(key)
            assert self.reports == ([] if evicted is None else [(evicted, EvictionCause.SIZE)])
        self.reports.clear()

    @rule(key=KEYS)
    def get(self, key: str) -> None:
        held = any(k == key for k, _ in self.reference.queue)
        assert (self.cache.get(key) is not None) is held
        if held:
            self.reference.visit(key)

    @rule(key=KEYS)
    def remove(self, key: str) -> None:
        held = any(k == key for k, _ in self.reference.queue)
        assert self.cache.remove(key) is held
        if held:
            self.reference.remove(key)
        self.reports.clear()

    @invariant()
    def holds_the_same_keys(self) -> None:
        assert len(self.cache) == len(self.reference.queue)
        assert all(key in self.cache for key, _ in self.reference.queue)


class WeightedSieveMachine(RuleBasedStateMachine):
    """With a weigher: the entries evicted are those a weighted textbook SIEVE evicts, and the
    weight in the statistics is the weight of what is held."""

    def __init__(self) -> None:
        super().__init__()
        self.reports: list[tuple[str, EvictionCause]] = []
        self.cache: Cache[str, int] = Cache(TTL)
        self.reference = WeightedReferenceSieve(1)

    @initialize(max_weight=st.integers(min_value=1, max_value=8))
    def make_cache(self, max_weight: int) -> None:
        self.cache = Cache(
            TTL,
            weigher=lambda key, value: value,
            max_weight=max_weight,
            clock=lambda: 0.0,
            on_evict=lambda key, value, cause: self.reports.append((key, cause)),
        )
        self.reference = WeightedReferenceSieve(max_weight)

    @rule(key=KEYS, weight=st.integers(min_value=0, max_value=9))
    def set(self, key: str, weight: int) -> None:
        if weight > self.reference.max_weight:
            with pytest.raises(ValueError, match="max_weight"):
                self.cache.set(key, weight)
            assert self.reports == []
            return
        replaced = key in self.reference.weights
        self.cache.set(key, weight)
        evicted = self.reference.put(key, weight)
        expected = [(key, EvictionCause.REPLACED)] if replaced else []
        expected += [(k, EvictionCause.SIZE) for k in evicted]
        assert self.reports == expected
        self.reports.clear()

    @rule(key=KEYS)
    def get(self, key: str) -> None:
        held = key in self.reference.weights
        assert (self.cache.get(key) is not None) is held
        if held:
            self.reference.visit(key)

    @rule(key=KEYS)
    def remove(self, key: str) -> None:
        held = key in self.reference.weights
        assert self.cache.remove(key) is held
        if held:
            self.reference.remove(key)
        self.reports.clear()

    @invariant()
    def holds_the_same_keys_and_weight(self) -> None:
        stats = self.cache.statistics()
        assert sorted(self.cache.keys()) == sorted(self.reference.weights)
        assert stats.weight == sum(self.reference.weights.values()) <= stats.max_weight


MACHINE_SETTINGS = settings(max_examples=150, stateful_step_count=40, deadline=None)
CacheMachine.TestCase.settings = MACHINE_SETTINGS
SieveMachine.TestCase.settings = MACHINE_SETTINGS
WeightedSieveMachine.TestCase.settings = MACHINE_SETTINGS
TestCacheMachine = CacheMachine.TestCase
TestSieveMachine = SieveMachine.TestCase
TestWeightedSieveMachine = WeightedSieveMachine.TestCase
