"""Answer checking: the final answer extracted from a generated text and from its reference by one rule, compared
exactly (numbers as numbers), and pass@k over several samples per prompt (the unbiased estimator).

Rules (``evaluation.answers.<eval set>``), each applied the same way to the generation and to the reference:

- ``gsm8k``: the first number after the last ``####`` (GSM8K's ``... #### 72``); none without ``####``.
- ``last_number``: the last number in the text.
- ``boxed``: the content of the last ``\\boxed{...}`` (or ``\\fbox{...}``; nested braces kept), read as a number
  when it is one (``\\frac{a}{b}``, ``\\dfrac``, ``a/b``, ``\\text{...}`` units, ``\\%``, ``$`` allowed), else as
  text with its spaces removed (``\\boxed{x + 1}`` = ``\\boxed{x+1}``).
- ``choice``: a choice letter A-J (upper case): the letter after ``answer is`` / ``answer:`` (the last one), else
  a ``\\boxed{X}``, else the letter a text begins with (``B``, ``(B)``, ``B)``, ``B.``, ``B:``; not ``B Paris``:
  ``A`` may be an article), else the last ``(X)``.

A number is an optional sign (``-``, ``−``), an optional ``$``, digits with optional thousands separators (commas
in groups of three: ``1,000``; ``1,2,3`` is three numbers), an optional decimal part (``.5``, ``2.50``);
a unit or ``%`` after it is dropped (``18 dollars`` = ``18``, ``50%`` = ``50``). Numbers are compared as
exact rationals (``fractions.Fraction``): ``1,000`` = ``1000`` = ``1000.0``; ``0.5`` = ``1/2`` (in a boxed
answer). The canonical form (:func:`extract_answer`) is an integer (``1000``), a terminating decimal (``0.25``)
or ``n/d``; a text answer is kept as normalised text. Not read as numbers: scientific notation, spaces as
thousands separators, words (``twelve``).

pass@k (Chen et al. 2021, "Evaluating Large Language Models Trained on Code", eq. 1): with n samples of a
prompt of which c are correct, ``pass@k = 1 - C(n - c, k) / C(n, k)``, the probability that at least one of k
samples drawn without replacement from the n is correct (unbiased for k <= n); averaged over prompts.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from fractions import Fraction
from typing import get_args

from kd_core.config.metrics import AnswerRule
from kd_core.errors import DataError
from kd_core.evaluation.text_metrics import references

__all__ = ["AnswerRule", "RULES", "extract_answer", "answer_match", "pass_at_k", "canonical_number", "check_references"]

RULES: tuple[str, ...] = get_args(AnswerRule)

_DIGITS = r"(?:(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+)(?!\d)"
# a number, not inside a word or another number: optional sign, optional $, digits
_NUMBER = re.compile(rf"(?<![\w.])(?P<sign>[-−]?)\$?(?P<digits>{_DIGITS})")
_FULL_NUMBER = re.compile(rf"\s*(?P<sign>[-−]?)\$?(?P<num>{_DIGITS})\s*(?:/\s*(?P<den>{_DIGITS}))?"
                          r"\s*(?:%|[A-Za-z][A-Za-z .]*)?\s*\.?\s*")
_LATEX_UNWRAP = re.compile(r"\\(?:text|textbf|mathrm|mathbf|mbox)\s*\{([^{}]*)\}")
_LATEX_FRAC = re.compile(r"\\[dt]?frac\s*\{([^{}]*)\}\s*\{([^{}]*)\}")
_LATEX_DROP = re.compile(r"\\[!,;: ]|\\left|\\right|\^\s*\{?\\circ\}?|\\?\$")
_ANSWER_IS = re.compile(r"(?i:answer)\s*(?:(?i:is)|:)\s*:?\s*(?:(?i:option)\s*)?\(?([A-J])\)?(?!\w)")
_LEADING_LETTER = re.compile(r"\s*(?:\(([A-J])\)|([A-J])(?:[).:]|\s*$))")
_PAREN_LETTER = re.compile(r"\(([A-J])\)")


def _fraction(sign: str, digits: str) -> Fraction:
    value = Fraction(digits.replace(",", ""))
    return -value if sign else value


def _render(value: Fraction) -> str:
    """An integer, a terminating decimal, or n/d."""
    if value.denominator == 1:
        return str(value.numerator)
    den = value.denominator
    for p in (2, 5):
        while den % p == 0:
            den //= p
    if den != 1:
        return f"{value.numerator}/{value.denominator}"
    places = 0
    while (value * 10 ** places).denominator != 1:
        places += 1
    digits = str(abs(value.numerator * 10 ** places // value.denominator)).rjust(places + 1, "0")
    return f"{'-' if value < 0 else ''}{digits[:-places]}.{digits[-places:]}"


def canonical_number(text: str) -> str | None:
    """The canonical form of a text that is one number (with an optional unit or %, or a fraction a/b), else None."""
    match = _FULL_NUMBER.fullmatch(text)
    if match is None:
        return None
    value = _fraction("", match["num"])
    if match["den"] is not None:
        den = _fraction("", match["den"])
        if den == 0:
            return None
        value /= den
    return _render(-value if match["sign"] else value)


def _numbers(text: str) -> list[str]:
    return [_render(_fraction(m["sign"], m["digits"])) for m in _NUMBER.finditer(text)]


def _braced(text: str, start: int) -> str | None:
    """The content of the balanced braces that open at text[start] ('{'), or None when they do not close."""
    depth = 0
    for i in range(start, len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return text[start + 1:i]
    return None


def _last_boxed(text: str) -> str | None:
    starts = [m.end() for m in re.finditer(r"\\(?:boxed|fbox)\s*", text)]
    if not starts:
        return None
    start = starts[-1]
    if start < len(text) and text[start] == "{":
        return _braced(text, start)
    bare = re.match(r"\S+", text[start:])  # `\boxed 5`
    return bare.group(0) if bare else None


def _latex_plain(text: str) -> str:
    previous = None
    while previous != text:  # innermost first: \frac{\text{1}}{2}
        previous = text
        text = _LATEX_UNWRAP.sub(r"\1", text)
        text = _LATEX_FRAC.sub(r"(\1)/(\2)", text)
    text = _LATEX_DROP.sub("", text).replace("\\%", "%")
    return re.sub(r"\((\s*[-−]?[\d.,]+\s*)\)", r"\1", text)  # (3)/(4) -> 3/4


def _boxed(text: str) -> str | None:
    content = _last_boxed(text)
    if content is None:
        return None
    plain = _latex_plain(content).strip()
    number = canonical_number(plain)
    if number is not None:
        return number
    return "".join(plain.split()).lower() or None


def _choice(text: str) -> str | None:
    stated = _ANSWER_IS.findall(text)
    if stated:
        return stated[-1]
    boxed = _last_boxed(text)
    letter = None if boxed is None else _latex_plain(boxed).strip().strip("()")
    if letter is not None and re.fullmatch(r"[A-J]", letter):
        return letter
    leading = _LEADING_LETTER.match(text)
    if leading:
        return leading.group(1) or leading.group(2)
    parens = _PAREN_LETTER.findall(text)
    return parens[-1] if parens else None


def extract_answer(text: str, rule: str) -> str | None:
    """The canonical final answer of ``text`` by ``rule`` (module docstring), or None when it has none."""
    if rule == "gsm8k":
        marker = text.rfind("####")
        numbers = _numbers(text[marker + 4:]) if marker >= 0 else []
        return numbers[0] if numbers else None
    if rule == "last_number":
        numbers = _numbers(text)
        return numbers[-1] if numbers else None
    if rule == "boxed":
        return _boxed(text)
    if rule == "choice":
        return _choice(text)
    raise ValueError(f"unknown answer rule {rule!r} (allowed: {', '.join(RULES)})")


def answer_match(pred: str, ref: str | Sequence[str], rule: str) -> float:
    """1.0 if the prediction's extracted answer equals the reference's (any of several references), else 0.0;
    a prediction without an answer scores 0."""
    answer = extract_answer(pred, rule)
    return float(answer is not None and any(answer == extract_answer(r, rule) for r in references(ref)))


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased pass@k of one prompt with ``c`` correct among ``n`` samples: 1 - C(n-c, k) / C(n, k)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n (n={n}, c={c}, k={k})")
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def check_references(rows: Sequence[dict], rule: str, key: str) -> None:
    """Raise DataError when a row's reference (``response``; every one of several) has no answer by ``rule``: its
    matches would all be 0. The message names the first such row (its ``id``), how many there are, and ``key``."""
    bad = [r for r in rows if any(extract_answer(ref, rule) is None for ref in references(r["response"]))]
    if bad:
        first = bad[0]
        raise DataError(f"{key}: {len(bad)} of {len(rows)} rows have a reference without an answer by rule {rule!r}, "
                        f"e.g. row {first.get('id', '?')!r}: ...{str(first['response'])[-80:]!r} (rules: "
                        f"{', '.join(RULES)})")
