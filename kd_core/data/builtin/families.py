"""Task families: each is ``(rng, facts: FactCycle) -> {"instruction", "context", "response"}``.

Texts are short, lowercase, plain ASCII. :data:`FAMILIES` maps each family name to its
weight (share of rows) and generator; the first docstring line of a generator is its
:attr:`Family.doc`, the rest says what the family probes about distillation.
All pools are tuples (fixed order, no set iteration), so output depends on the rng only.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable

from kd_core.data.builtin.world import OPEN_QA_TEMPLATES, FactCycle

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


def _row(instruction: str, context: str, response: str) -> dict:
    return {"instruction": instruction, "context": context, "response": response}


def _a(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def _weighted(rng: random.Random, items: tuple[str, ...]) -> str:
    return rng.choices(items, weights=_BRAINSTORM_WEIGHTS[: len(items)], k=1)[0]


_ADD_TEMPLATES = ("what is {a} plus {b}?", "add {a} and {b}.", "what is the sum of {a} and {b}?",
                  "compute {a} + {b}.")
_SUB_TEMPLATES = ("what is {a} minus {b}?", "subtract {b} from {a}.", "compute {a} - {b}.")


def _arithmetic(rng: random.Random, facts: FactCycle) -> dict:
    """Single/two-digit addition and subtraction (non-negative results).

    The reference is unique, so this measures whether the student acquires a skill rather
    than a lookup; the teacher's soft labels carry information about near-miss digits.
    """
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


def _closed_qa(rng: random.Random, facts: FactCycle) -> dict:
    """Answer a question about 1-2 generated people by copying from the context.

    Learnable by teacher and student alike (a copy mechanism): the floor where KD should
    not hurt.
    """
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


def _open_qa(rng: random.Random, facts: FactCycle) -> dict:
    """A memorised fact about the seed's fictional world, asked without context.

    The capacity gap: the teacher can memorise the world's facts, the small student cannot
    store them all, so this is where distillation from a stronger model should pay off.
    """
    fact = facts.next_fact(rng)
    template = rng.choice(OPEN_QA_TEMPLATES[fact.attribute])
    return _row(template.format(e=fact.entity), "", fact.answer)


_PARITY_TEMPLATES = ("is {n} even or odd?", "is the number {n} odd or even?",
                     "is {n} an even or an odd number?")
_SENTIMENT_INSTRUCTIONS = ("is this review positive or negative?",
                           "classify the sentiment of this review.",
                           "does this review sound positive or negative?")
_GROUP_TEMPLATES = ("which group is {x} in: {opts}?", "is {x} {opts}?")


def _classification(rng: random.Random, facts: FactCycle) -> dict:
    """Parity of a number, sentiment of a templated review, or the group of an item.

    A one-token decision: tests calibration, where the teacher's soft distribution is most
    informative.
    """
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


def _rewrite(rng: random.Random, facts: FactCycle) -> dict:
    """Reverse a word list, sort 3-5 small numbers, or sort 3-4 words alphabetically.

    Needs positional reasoning over the whole input: hard for tiny models, so the
    teacher/student gap shows.
    """
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


def _rank_distribution(items: tuple[str, ...]) -> dict[str, float]:
    """``items`` -> the probability :func:`_weighted` draws each with: (1/(rank+1)) / sum."""
    weights = _BRAINSTORM_WEIGHTS[: len(items)]
    return {item: w / sum(weights) for item, w in zip(items, weights)}


def _brainstorm_index() -> dict[str, dict[str, float]]:
    """Every brainstorming instruction -> its valid answers (fixed order) with the references' probabilities."""
    index: dict[str, dict[str, float]] = {}
    for cat, items in BRAINSTORM_LISTS.items():
        for t in _SINGLE_TEMPLATES:
            index[t.format(c=_a(cat), n=cat)] = _rank_distribution(items)
    for c1, c2 in _COMBO_PAIRS:
        first, second = _rank_distribution(BRAINSTORM_LISTS[c1]), _rank_distribution(BRAINSTORM_LISTS[c2])
        answers = {f"{x} {y}": px * py for x, px in first.items() for y, py in second.items()}
        for t in _COMBO_TEMPLATES:
            index[t.format(c1=_a(c1), c2=_a(c2))] = answers
    return index


_BRAINSTORM_INDEX = _brainstorm_index()


def _brainstorming(rng: random.Random, facts: FactCycle) -> dict:
    """Name one item (or a color/fruit + item combo); reference = one skewed random draw.

    Several answers are valid and the reference follows a skewed distribution with a clear
    mode, which separates mode-seeking (reverse KL) from mean-seeking (forward KL) students.
    Score against the full valid set with :func:`valid_answers`.
    """
    if rng.random() < 0.6:
        cat = rng.choice(list(BRAINSTORM_LISTS))
        instruction = rng.choice(_SINGLE_TEMPLATES).format(c=_a(cat), n=cat)
        return _row(instruction, "", _weighted(rng, BRAINSTORM_LISTS[cat]))
    c1, c2 = rng.choice(_COMBO_PAIRS)
    instruction = rng.choice(_COMBO_TEMPLATES).format(c1=_a(c1), c2=_a(c2))
    answer = f"{_weighted(rng, BRAINSTORM_LISTS[c1])} {_weighted(rng, BRAINSTORM_LISTS[c2])}"
    return _row(instruction, "", answer)


def brainstorm_distributions() -> dict[str, dict[str, float]]:
    """Every brainstorming instruction -> {valid answer: probability that the generator's reference is it}.

    Single lists: p(rank r) = (1/(r+1)) / sum_k 1/(k+1); combinations "<first> <second>": the product of the two
    lists' probabilities (drawn independently). Each distribution sums to 1; its keys are the valid answers.
    """
    return {instruction: dict(answers) for instruction, answers in _BRAINSTORM_INDEX.items()}


def valid_answers(row: dict) -> list[str] | None:
    """All valid answers for a brainstorming row (derived from its instruction); None otherwise."""
    if row.get("category") != "brainstorming":
        return None
    key = " ".join(str(row["instruction"]).lower().split())
    try:
        return list(_BRAINSTORM_INDEX[key])
    except KeyError:
        raise ValueError(f"unknown brainstorming instruction: {row['instruction']!r}") from None


@dataclass(frozen=True)
class Family:
    """A task family: ``weight`` is its share of rows (normalised over :data:`FAMILIES`)."""

    name: str
    weight: float
    doc: str
    make: Callable[[random.Random, FactCycle], dict]

    def __str__(self) -> str:
        return self.doc


def _family(name: str, weight: float, fn: Callable[[random.Random, FactCycle], dict]) -> Family:
    return Family(name, weight, (fn.__doc__ or "").strip().partition("\n")[0], fn)


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
