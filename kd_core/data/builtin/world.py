"""The fictional open_qa world: entities with four facts each, a function of ``seed`` alone.

``build_world(seed)`` never depends on how many rows are generated, so train and test
splits ask about the same facts. :class:`FactCycle` hands the facts out in random
permutations so every fact is asked equally often.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Callable

# 40 entities x 4 attributes = 160 facts. Deliberately small: at the default
# ~2,500 rows (25% open_qa = ~625 rows) facts are cycled so each is asked 3-4
# times, hence a random 10% test split's facts are (almost always, ~99%) also
# in the training split, and the teacher sees each fact ~12 times in 3 epochs.
# With 150+ entities most facts would be asked at most once at this n: neither
# model could learn them and test facts would mostly be unseen in training.
N_ENTITIES = 40
WORLD_ATTRIBUTES: tuple[str, ...] = ("capital", "language", "export", "animal")

OPEN_QA_TEMPLATES: dict[str, tuple[str, ...]] = {
    "capital": ("what is the capital of {e}?",
                "which city is the capital of {e}?",
                "name the capital city of {e}."),
    "language": ("what language is spoken in {e}?",
                 "what do people in {e} speak?",
                 "which language do they speak in {e}?"),
    "export": ("what is the main export of {e}?",
               "what does {e} mainly export?",
               "name the chief export of {e}."),
    "animal": ("what is the national animal of {e}?",
               "which animal is the symbol of {e}?",
               "name the national animal of {e}."),
}

_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z",
           "th", "sh", "kr", "br", "dr", "gl", "qu", "tr")
_VOWELS = ("a", "e", "i", "o", "u", "a", "o")
_CODAS = ("", "", "n", "r", "l", "s", "m")
_COUNTRY_SUFFIXES = ("ania", "ia", "or", "ara", "esh", "ovia", "una", "eth", "istan", "ica")
_CITY_SUFFIXES = ("brook", "ford", "haven", "mere", "holt", "port", "gate", "wick", "dale",
                  "ton", "burg", "field")
_LANGUAGE_SUFFIXES = ("ish", "ic", "ese", "an", "i")
_EXPORTS = ("salt", "wool", "copper", "amber", "silk", "tea", "timber", "glass", "iron",
            "honey", "rice", "cotton", "marble", "coffee", "tin", "pearls", "spices",
            "wine", "furs", "olives")
_WORLD_ANIMALS = ("eagle", "lynx", "otter", "falcon", "wolf", "heron", "stag", "badger",
                  "swan", "bison", "raven", "seal", "hare", "crane", "boar", "moose")
_N_LANGUAGES = 16


@dataclass(frozen=True)
class Fact:
    entity: str
    attribute: str
    answer: str


@dataclass(frozen=True)
class World:
    """The fictional world: ``entities`` in generation order, ``facts`` entity-major."""

    seed: int
    entities: tuple[str, ...]
    facts: tuple[Fact, ...]

    def answer(self, entity: str, attribute: str) -> str:
        for f in self.facts:
            if f.entity == entity and f.attribute == attribute:
                return f.answer
        raise KeyError((entity, attribute))


def _syllable(rng: random.Random, coda: bool = False) -> str:
    s = rng.choice(_ONSETS) + rng.choice(_VOWELS)
    return s + rng.choice(_CODAS) if coda else s


def _unique_name(rng: random.Random, taken: set[str], make: Callable[[], str]) -> str:
    # `taken` is only used for membership tests, never iterated.
    for _ in range(1000):
        name = make()
        if name not in taken and len(name) <= 12:
            taken.add(name)
            return name
    raise RuntimeError("could not generate a unique name")  # pragma: no cover


def build_world(seed: int = 0, n_entities: int = N_ENTITIES) -> World:
    """The open_qa world for ``seed``: depends on ``seed`` (and ``n_entities``) only."""
    rng = random.Random(f"kd-builtin-world:{seed}")
    taken: set[str] = set()
    languages = [
        _unique_name(rng, taken, lambda: _syllable(rng) + _syllable(rng, coda=False).rstrip("aeiou")
                     + rng.choice(_LANGUAGE_SUFFIXES))
        for _ in range(_N_LANGUAGES)
    ]
    entities, facts = [], []
    for _ in range(n_entities):
        entity = _unique_name(rng, taken, lambda: _syllable(rng, coda=True)
                              + _syllable(rng).rstrip("aeiou") + rng.choice(_COUNTRY_SUFFIXES))
        capital = _unique_name(rng, taken, lambda: _syllable(rng, coda=True)
                               + rng.choice(_CITY_SUFFIXES))
        entities.append(entity)
        facts += [
            Fact(entity, "capital", capital),
            Fact(entity, "language", rng.choice(languages)),
            Fact(entity, "export", rng.choice(_EXPORTS)),
            Fact(entity, "animal", rng.choice(_WORLD_ANIMALS)),
        ]
    return World(seed=seed, entities=tuple(entities), facts=tuple(facts))


class FactCycle:
    """Hands out a world's facts: a fresh random permutation of all facts per cycle."""

    def __init__(self, world: World):
        self.world = world
        self._queue: list[Fact] = []

    def next_fact(self, rng: random.Random) -> Fact:
        if not self._queue:
            self._queue = list(self.world.facts)
            rng.shuffle(self._queue)
        return self._queue.pop()


_OPEN_QA_PATTERNS: tuple[tuple[re.Pattern[str], str], ...] = tuple(
    (re.compile("^" + re.escape(t).replace(re.escape("{e}"), "([a-z]+)") + "$"), attr)
    for attr, templates in OPEN_QA_TEMPLATES.items() for t in templates
)


def open_qa_key(instruction: str) -> tuple[str, str] | None:
    """``(entity, attribute)`` asked by an open_qa instruction, or None if it is not one."""
    text = instruction.strip().lower()
    for pattern, attr in _OPEN_QA_PATTERNS:
        m = pattern.match(text)
        if m:
            return m.group(1), attr
    return None
