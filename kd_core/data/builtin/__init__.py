"""Built-in instruction data set, generated deterministically from a seed.

Rows follow Dolly-15k's schema::

    {"instruction": str, "context": str (may be ""), "response": str,
     "category": str, "id": "builtin-000123"}

Six task families (:mod:`.families`), each probing a different aspect of distillation at
tiny scale; open_qa asks about a fixed fictional world (:mod:`.world`). Determinism: every
random choice goes through ``random.Random`` seeded from ``seed`` and every pool is a list
or tuple, so the same ``(n_examples, seed)`` gives identical output in any process.
:func:`generate_unlabeled` gives the unlabeled prompt pool (response "", prompts disjoint from the ones
it is told to avoid): the prompts a teacher answers for a transfer set.
"""

from kd_core.data.builtin.families import (
    BRAINSTORM_LISTS,
    FAMILIES,
    NEGATIVE_WORDS,
    POSITIVE_WORDS,
    Family,
    brainstorm_distributions,
    valid_answers,
)
from kd_core.data.builtin.generate import ID_PREFIX, UNLABELED_ID_PREFIX, generate_builtin, generate_unlabeled
from kd_core.data.builtin.world import (
    N_ENTITIES,
    OPEN_QA_TEMPLATES,
    WORLD_ATTRIBUTES,
    Fact,
    World,
    build_world,
    open_qa_key,
)

__all__ = [
    "FAMILIES",
    "Family",
    "Fact",
    "World",
    "build_world",
    "generate_builtin",
    "generate_unlabeled",
    "valid_answers",
    "brainstorm_distributions",
    "open_qa_key",
    "ID_PREFIX",
    "UNLABELED_ID_PREFIX",
    "N_ENTITIES",
    "WORLD_ATTRIBUTES",
    "OPEN_QA_TEMPLATES",
    "BRAINSTORM_LISTS",
    "POSITIVE_WORDS",
    "NEGATIVE_WORDS",
]
