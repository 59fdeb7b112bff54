"""Built-in instruction data set, generated deterministically from a seed.

The pipeline cannot download anything, so the default data set (and every
test) uses this generator. Rows follow Dolly-15k's schema::

    {"instruction": str, "context": str (may be ""), "response": str,
     "category": str, "id": "builtin-000123"}

The data is designed so that knowledge distillation is *meaningful at tiny
scale*: a ~4M-parameter teacher trained for a couple of CPU minutes should
learn most of it, while a ~0.7M student trained on the same data learns
clearly less. Texts are short (training cost is per token), lowercase, plain
ASCII. Each task family exists to probe a different aspect of KD:

``arithmetic``
    Exact-answer computation (single/two-digit plus/minus). Easy to medium;
    the reference is unique, so it measures whether the student acquires a
    *skill* rather than a lookup. The teacher's soft labels carry information
    about near-miss digits.
``closed_qa``
    Reading comprehension by copying: the context names 1-2 people and their
    city/job/pet, the question asks one attribute. Easy and learnable by both
    models (an attention/copy mechanism); it is the "floor" where KD should
    not hurt.
``open_qa``
    Memorised facts about a fixed fictional world (no context). The world is a
    function of ``seed`` alone, never of ``n_examples``, so train and test
    splits share facts (each test fact appears in training under the same or
    a paraphrased template). This is the *capacity gap*: the teacher can
    memorise the facts, the small student cannot store them all, which is
    where distillation from a stronger model should pay off (or not).
``classification``
    Short-label decisions (even/odd, review sentiment with negation, which
    group an item belongs to). Easy; tests calibration of a one-token
    decision, where the teacher's soft distribution is most informative.
``rewrite``
    Sequence manipulation: reverse a word list, sort numbers ascending, sort
    words alphabetically. Medium to hard for tiny models (needs positional
    reasoning over the whole input), so the teacher/student gap shows.
``brainstorming``
    Several valid answers ("name a fruit."). The reference is one draw from a
    fixed *skewed* distribution over the valid set, so the teacher learns a
    multi-modal output distribution with a clear mode. This separates
    mode-seeking (reverse KL) from mean-seeking (forward KL) students; use
    :func:`valid_answers` to score against the full valid set.

Determinism: every random choice goes through ``random.Random`` instances
seeded from ``seed`` (ints, or strings, which Python seeds via SHA-512), and
all pools are lists or tuples: no ``hash()``-dependent order, no iteration
over sets. Same ``(n_examples, seed)`` gives identical output in any process.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Callable

__all__ = [
    "FAMILIES",
    "Family",
    "Fact",
    "World",
    "build_world",
    "generate_builtin",
    "valid_answers",
    "open_qa_key",
    "ID_PREFIX",
    "N_ENTITIES",
    "WORLD_ATTRIBUTES",
    "OPEN_QA_TEMPLATES",
    "BRAINSTORM_LISTS",
    "POSITIVE_WORDS",
    "NEGATIVE_WORDS",
]

ID_PREFIX = "builtin-"

# --------------------------------------------------------------------------
# Word pools (tuples: fixed order, no set iteration anywhere)
# --------------------------------------------------------------------------

# Category -> items. Items are single words and unique across categories
# (used by brainstorming and by the "which group" classification task).
BRAINSTORM_LISTS: dict[str, tuple[str, ...]] = {
    "fruit": ("apple", "banana", "cherry", "grape", "mango", "pear", "plum", "lemon"),
    "animal": ("dog", "horse", "tiger", "whale", "rabbit", "fox", "owl", "bear"),
    "color": ("blue", "red", "green", "yellow", "purple", "black", "white", "pink"),
    "vegetable": ("carrot", "potato", "onion", "cabbage", "leek", "spinach", "pea", "corn"),
    "sport": ("tennis", "soccer", "golf", "rugby", "hockey", "boxing", "rowing", "cycling"),
    "instrument": ("piano", "guitar", "violin", "drum", "flute", "harp", "cello", "trumpet"),
}
# Reference answers are drawn with weights 1/(rank+1): the first item of each
# list is the mode (~37% for 8 items), the tail is still reasonably likely.
_BRAINSTORM_WEIGHTS = tuple(1.0 / (r + 1) for r in range(8))

POSITIVE_WORDS: tuple[str, ...] = (
    "great", "lovely", "excellent", "wonderful", "amazing", "superb", "good", "delightful",
)
NEGATIVE_WORDS: tuple[str, ...] = (
    "awful", "terrible", "boring", "bland", "rude", "dull", "poor", "horrible",
)
_REVIEW_ITEMS = ("soup", "film", "hotel", "book", "service", "concert", "game", "coffee",
                 "pizza", "show", "room", "album")

_PEOPLE = ("mira", "tomas", "lena", "omar", "ines", "kofi", "anya", "ravi", "nora", "hugo",
           "sara", "ivan", "maya", "leo", "yuki", "pablo", "zara", "emil", "tara", "jonas",
           "lila", "arun", "elsa", "felix", "nadia", "oscar", "rosa", "samir", "vera", "kai")
_CITIES = ("oslo", "lima", "cairo", "paris", "tokyo", "dublin", "quito", "rome", "delhi",
           "lagos", "madrid", "seoul", "vienna", "denver", "perth", "boston", "berlin",
           "nairobi", "prague", "havana", "lisbon", "moscow", "sydney", "toronto")
_JOBS = ("baker", "nurse", "pilot", "teacher", "farmer", "doctor", "painter", "plumber",
         "lawyer", "chef", "dentist", "sailor", "writer", "engineer", "artist", "tailor",
         "actor", "judge", "miner", "editor")
_PETS = ("cat", "parrot", "goldfish", "hamster", "turtle", "lizard", "puppy", "kitten",
         "snake", "ferret")

_REWRITE_WORDS = ("red", "fox", "jumps", "over", "lazy", "river", "stone", "bright", "moon",
                  "quiet", "tree", "blue", "sky", "runs", "fast", "small", "house", "warm",
                  "bread", "cold", "wind", "old", "road", "green", "hill", "dark", "night",
                  "sings", "bird", "deep", "lake", "soft", "rain", "tall", "ship", "sails",
                  "gold", "sand", "wild", "rose")

# --------------------------------------------------------------------------
# The fictional world for open_qa (a function of seed alone)
# --------------------------------------------------------------------------

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


# --------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------

def _a(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def _weighted(rng: random.Random, items: tuple[str, ...]) -> str:
    return rng.choices(items, weights=_BRAINSTORM_WEIGHTS[: len(items)], k=1)[0]


# --------------------------------------------------------------------------
# Task families: one small function each, (rng, state) -> row without id
# --------------------------------------------------------------------------

_ADD_TEMPLATES = ("what is {a} plus {b}?", "add {a} and {b}.", "what is the sum of {a} and {b}?",
                  "compute {a} + {b}.")
_SUB_TEMPLATES = ("what is {a} minus {b}?", "subtract {b} from {a}.", "compute {a} - {b}.")


def _arithmetic(rng: random.Random, state: "_State") -> dict:
    """Single/two-digit addition and subtraction (non-negative results)."""
    hi = rng.choice((9, 20, 99))  # difficulty: single digit, teens, two digits
    a, b = rng.randint(0, hi), rng.randint(0, hi)
    if rng.random() < 0.5:
        return _row(rng.choice(_ADD_TEMPLATES).format(a=a, b=b), "", str(a + b))
    a, b = max(a, b), min(a, b)
    return _row(rng.choice(_SUB_TEMPLATES).format(a=a, b=b), "", str(a - b))


_CITY_QUESTIONS = ("where does {p} live?", "in which city does {p} live?",
                   "what city does {p} live in?")
_JOB_QUESTIONS = ("what is {p}'s job?", "what does {p} do for work?", "what is {p}'s profession?")
_PET_QUESTIONS = ("what pet does {p} have?", "which animal does {p} own?")
_WHO_QUESTIONS = ("who lives in {c}?", "which person lives in {c}?")


def _closed_qa(rng: random.Random, state: "_State") -> dict:
    """Answer a question about 1-2 generated people by copying from the context."""
    if rng.random() < 0.5:
        p, c, j, pet = (rng.choice(pool) for pool in (_PEOPLE, _CITIES, _JOBS, _PETS))
        context = rng.choice((
            "{p} lives in {c}, works as {j} and has {pet}.",
            "{p} is {j} from {c} who owns {pet}.",
        )).format(p=p, c=c, j=_a(j), pet=_a(pet))
        kind = rng.choice(("city", "job", "pet"))
        if kind == "city":
            return _row(rng.choice(_CITY_QUESTIONS).format(p=p), context, c)
        if kind == "job":
            return _row(rng.choice(_JOB_QUESTIONS).format(p=p), context, j)
        return _row(rng.choice(_PET_QUESTIONS).format(p=p), context, pet)
    people, cities, jobs = (rng.sample(pool, 2) for pool in (_PEOPLE, _CITIES, _JOBS))
    sentences = [
        rng.choice(("{p} lives in {c} and works as {j}.", "{p} is {j} who lives in {c}."))
        .format(p=p, c=c, j=_a(j))
        for p, c, j in zip(people, cities, jobs)
    ]
    context = " ".join(sentences)
    i = rng.randrange(2)
    kind = rng.choice(("city", "job", "who"))
    if kind == "city":
        return _row(rng.choice(_CITY_QUESTIONS).format(p=people[i]), context, cities[i])
    if kind == "job":
        return _row(rng.choice(_JOB_QUESTIONS).format(p=people[i]), context, jobs[i])
    return _row(rng.choice(_WHO_QUESTIONS).format(c=cities[i]), context, people[i])


def _open_qa(rng: random.Random, state: "_State") -> dict:
    """A memorised fact about the seed's fictional world, asked without context."""
    fact = state.next_fact(rng)
    template = rng.choice(OPEN_QA_TEMPLATES[fact.attribute])
    return _row(template.format(e=fact.entity), "", fact.answer)


_PARITY_TEMPLATES = ("is {n} even or odd?", "is the number {n} odd or even?",
                     "is {n} an even or an odd number?")
_SENTIMENT_INSTRUCTIONS = ("is this review positive or negative?",
                           "classify the sentiment of this review.",
                           "does this review sound positive or negative?")
_GROUP_TEMPLATES = ("which group is {x} in: {opts}?", "is {x} {opts}?")


def _classification(rng: random.Random, state: "_State") -> dict:
    """Parity of a number, sentiment of a templated review, or the group of an item."""
    kind = rng.choice(("parity", "sentiment", "group"))
    if kind == "parity":
        n = rng.randint(0, 99)
        return _row(rng.choice(_PARITY_TEMPLATES).format(n=n), "", "odd" if n % 2 else "even")
    if kind == "sentiment":
        item = rng.choice(_REVIEW_ITEMS)
        r = rng.random()
        if r < 0.4:
            adj, label = rng.choice(POSITIVE_WORDS), "positive"
        elif r < 0.8:
            adj, label = rng.choice(NEGATIVE_WORDS), "negative"
        else:  # negated positive adjective: harder, needs the word "not"
            adj, label = "not " + rng.choice(POSITIVE_WORDS), "negative"
        review = rng.choice(("the {i} was {a}.", "i thought the {i} was {a}.",
                             "honestly, the {i} was {a}.")).format(i=item, a=adj)
        return _row(rng.choice(_SENTIMENT_INSTRUCTIONS), review, label)
    groups = rng.sample(list(BRAINSTORM_LISTS), 3)
    label = groups[0]
    x = rng.choice(BRAINSTORM_LISTS[label])
    rng.shuffle(groups)
    template = rng.choice(_GROUP_TEMPLATES)
    if template.startswith("is "):
        opts = f"{_a(groups[0])}, {_a(groups[1])} or {_a(groups[2])}"
    else:
        opts = f"{groups[0]}, {groups[1]} or {groups[2]}"
    return _row(template.format(x=x, opts=opts), "", label)


_REVERSE_TEMPLATES = ("reverse the words: {w}", "reverse the word order: {w}",
                      "write these words in reverse order: {w}")
_SORT_NUM_TEMPLATES = ("sort ascending: {w}", "sort these numbers from smallest to largest: {w}",
                       "put these numbers in ascending order: {w}")
_SORT_WORD_TEMPLATES = ("sort these words alphabetically: {w}", "put in alphabetical order: {w}")


def _rewrite(rng: random.Random, state: "_State") -> dict:
    """Reverse a word list, sort 3-5 small numbers, or sort 3-4 words alphabetically."""
    r = rng.random()
    if r < 0.4:
        words = rng.sample(_REWRITE_WORDS, rng.randint(3, 5))
        return _row(rng.choice(_REVERSE_TEMPLATES).format(w=" ".join(words)), "",
                    " ".join(reversed(words)))
    if r < 0.8:
        nums = rng.sample(range(0, 50), rng.randint(3, 5))
        while nums == sorted(nums):  # never a no-op
            rng.shuffle(nums)
        return _row(rng.choice(_SORT_NUM_TEMPLATES).format(w=" ".join(map(str, nums))), "",
                    " ".join(map(str, sorted(nums))))
    words = rng.sample(_REWRITE_WORDS, rng.randint(3, 4))
    while words == sorted(words):
        rng.shuffle(words)
    return _row(rng.choice(_SORT_WORD_TEMPLATES).format(w=" ".join(words)), "",
                " ".join(sorted(words)))


_SINGLE_TEMPLATES = ("name {c}.", "give me an example of {c}.", "suggest one {n}.",
                     "tell me {c}.")
# (first category, second category): the answer is "<first> <second>", e.g. "blue whale".
_COMBO_PAIRS = (("color", "animal"), ("color", "fruit"), ("color", "instrument"),
                ("fruit", "instrument"))
_COMBO_TEMPLATES = ("give {c1} and {c2}.", "name {c1} and {c2}.")


def _brainstorm_instructions() -> dict[str, list[str]]:
    """Every brainstorming instruction -> its full list of valid answers (fixed order)."""
    index: dict[str, list[str]] = {}
    for cat, items in BRAINSTORM_LISTS.items():
        for t in _SINGLE_TEMPLATES:
            index[t.format(c=_a(cat), n=cat)] = list(items)
    for c1, c2 in _COMBO_PAIRS:
        answers = [f"{x} {y}" for x in BRAINSTORM_LISTS[c1] for y in BRAINSTORM_LISTS[c2]]
        for t in _COMBO_TEMPLATES:
            index[t.format(c1=_a(c1), c2=_a(c2))] = answers
    return index


_BRAINSTORM_INDEX = _brainstorm_instructions()


def _brainstorming(rng: random.Random, state: "_State") -> dict:
    """Name one item (or a color/fruit + item combo); reference = one skewed random draw."""
    if rng.random() < 0.6:
        cat = rng.choice(list(BRAINSTORM_LISTS))
        instruction = rng.choice(_SINGLE_TEMPLATES).format(c=_a(cat), n=cat)
        return _row(instruction, "", _weighted(rng, BRAINSTORM_LISTS[cat]))
    c1, c2 = rng.choice(_COMBO_PAIRS)
    instruction = rng.choice(_COMBO_TEMPLATES).format(c1=_a(c1), c2=_a(c2))
    answer = f"{_weighted(rng, BRAINSTORM_LISTS[c1])} {_weighted(rng, BRAINSTORM_LISTS[c2])}"
    return _row(instruction, "", answer)


def valid_answers(row: dict) -> list[str] | None:
    """All valid answers for a brainstorming row (derived from its instruction); None otherwise."""
    if row.get("category") != "brainstorming":
        return None
    key = " ".join(str(row["instruction"]).lower().split())
    try:
        return list(_BRAINSTORM_INDEX[key])
    except KeyError:
        raise ValueError(f"unknown brainstorming instruction: {row['instruction']!r}") from None


# --------------------------------------------------------------------------
# Registry and generator
# --------------------------------------------------------------------------

@dataclass(frozen=True)
class Family:
    name: str
    weight: float
    doc: str
    make: Callable[[random.Random, "_State"], dict]

    def __str__(self) -> str:
        return self.doc


def _family(name: str, weight: float, fn: Callable) -> Family:
    return Family(name, weight, (fn.__doc__ or "").strip(), fn)


FAMILIES: dict[str, Family] = {
    f.name: f for f in (
        _family("open_qa", 0.25, _open_qa),
        _family("closed_qa", 0.15, _closed_qa),
        _family("arithmetic", 0.15, _arithmetic),
        _family("classification", 0.15, _classification),
        _family("rewrite", 0.15, _rewrite),
        _family("brainstorming", 0.15, _brainstorming),
    )
}


class _State:
    """Per-call generation state: cycles through the world's facts so coverage is even."""

    def __init__(self, world: World):
        self.world = world
        self._queue: list[Fact] = []

    def next_fact(self, rng: random.Random) -> Fact:
        if not self._queue:  # a fresh random permutation of all facts per cycle
            self._queue = list(self.world.facts)
            rng.shuffle(self._queue)
        return self._queue.pop()


def _row(instruction: str, context: str, response: str) -> dict:
    return {"instruction": instruction, "context": context, "response": response}


def _quotas(n: int) -> list[tuple[str, int]]:
    """Exact per-family counts for n rows (largest remainder; ties by FAMILIES order)."""
    total = sum(f.weight for f in FAMILIES.values())
    raw = [(name, n * f.weight / total) for name, f in FAMILIES.items()]
    counts = {name: int(x) for name, x in raw}
    order = sorted(range(len(raw)), key=lambda i: (-(raw[i][1] - int(raw[i][1])), i))
    for i in order[: n - sum(counts.values())]:
        counts[raw[i][0]] += 1
    return list(counts.items())


def generate_builtin(n_examples: int, seed: int = 0) -> list[dict]:
    """Generate ``n_examples`` Dolly-schema rows, deterministically from ``seed``.

    Rows have keys instruction, context ("" when unused), response, category
    and id ("builtin-000123", the row's position). Family counts follow the
    weights in :data:`FAMILIES` exactly (largest remainder) and rows are
    shuffled across families. open_qa facts come from :func:`build_world`
    (seed only), cycled so that every fact is asked about equally often.
    """
    if not isinstance(n_examples, int) or isinstance(n_examples, bool) or n_examples < 0:
        raise ValueError(f"n_examples must be a non-negative int, got {n_examples!r}")
    rng = random.Random(seed)
    state = _State(build_world(seed))
    categories = [name for name, k in _quotas(n_examples) for _ in range(k)]
    rng.shuffle(categories)
    rows = []
    for i, name in enumerate(categories):
        row = FAMILIES[name].make(rng, state)
        row["category"] = name
        row["id"] = f"{ID_PREFIX}{i:06d}"
        rows.append(row)
    return rows
