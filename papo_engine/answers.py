"""Is a predicted final answer equivalent to the reference? `answers_match(predicted, reference) -> bool`.

Three kinds of reference, checked in this order:
- a multiple-choice letter (`B`, `(B)`, `Option B`, `\\text{(B)}`): the prediction must name the same letter
  (`(B)`, `b`, `B.`, `(B) 12`); it never matches a number;
- plain words (`red`, `light blue`): case-, space- and trailing-period-insensitive string equality only.
  math_verify would read `red` as the product r*e*d, so `red` == `erd` and `abc` == `cba` there;
- anything else goes to math_verify (`parse` + `verify`, default precision): `1/2` == `0.5` == `\\frac{1}{2}`,
  `2\\sqrt{2}` == `\\sqrt{8}`, `1,000` == `1000`, `50\\%` == `0.5` == `50`, `30^\\circ` == `30`, sets and intervals.
  Floats are rounded to 6 decimals, so `0.333333` == `1/3` but `0.333` != `1/3`.

Units after a plain number are dropped (`3 cm`, `3\\text{ cm}`, `5\\ \\text{m}^2` == the bare number); when both sides
carry a unit the units must agree (`3 red` != `3 blue`). math_verify's own unit stripping is switched off: it knows
one-letter "units" (`t`, `s`, `h`, ...) and would make `2x+3t` equal to `2x+3`.

math_verify bounds parse and verify time with SIGALRM (1 s here), which only works in the main thread; in other
threads, or while the caller has its own alarm pending, its timeouts are turned off (it would raise, or cancel that
alarm). So inputs that can stall sympy without a timeout (exponent towers, big factorials, big powers of compound
bases, answers over 500 characters) are compared as plain strings only, in every thread.
Any error or timeout gives False.
"""
from __future__ import annotations

import os
import re
import signal
import threading
from functools import lru_cache

from latex2sympy2_extended.latex2sympy2 import NormalizationConfig
from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify
from math_verify.errors import TimeoutException

_TIMEOUT_S = 1
_MAX_MATH_LEN = 500
_EXTRACTION = (
    LatexExtractionConfig(boxed_match_priority=0, normalization_config=NormalizationConfig(
        basic_latex=True, units=False, malformed_operators=True, nits=True, boxed="all", equations=False)),
    ExprExtractionConfig(),
)
_TEXT_NAMES = r"text|textbf|textit|textrm|mathrm|mathbf|mbox|operatorname"
_TEXT_WRAP = re.compile(rf"\\(?:{_TEXT_NAMES})\s*\{{([^{{}}]*)\}}")
_WORDS = re.compile(r"[a-z]{2,}(?:[ '-][a-z]+)*")
_CHOICE = re.compile(r"(?:(?:option|choice|answer)\s*:?\s*)?\(?([a-z])\)?[.:]?")
_CHOICE_WITH_TEXT = re.compile(r"\(([a-z])\)\s*.+|([a-z])[).:]\s+.+")
_POWER = r"(?:\s*\^\s*\{?-?\d\}?)?"
_TEXT_UNIT = rf"\\(?:{_TEXT_NAMES})\s*\{{[^{{}}]*\}}{_POWER}"                                # \text{ cm}, \mathrm{m}^2
_UNIT_WORD = rf"(?!(?:pi|e|i|inf|infty|infinity)\b)(?:[A-Za-z]{{2,}}|[mgshlMGSHL])\b{_POWER}"  # cm, m^2, apples
_FIRST_UNIT = rf"(?:{_TEXT_UNIT}|(?<=[\s~,;:]){_UNIT_WORD}|(?:mm|cm|km|kg|mg|ml)\b{_POWER})"  # 3cm: no space
_UNIT_TAIL = re.compile(rf"(?:\\[ ,;:]|~|\s)*(?P<unit>{_FIRST_UNIT}(?:(?:\s*/\s*|\s+)(?:{_TEXT_UNIT}|{_UNIT_WORD}))*)\s*$")
_UNIT_NOISE = re.compile(rf"\\(?:{_TEXT_NAMES})|[\s{{}}\\]")
_LATEX_CMD = re.compile(r"\\[A-Za-z]+")
_POW = r"(?:\^|\*\*)\s*[{(]*\s*[-+]?"
_EXPLOSIVE = re.compile(rf"{_POW}[\d.]+\s*[}})]*\s*(?:\^|\*\*)"  # towers: 10^{10^{10}}, 10^{10}^{10}
                        rf"|{_POW}\d{{7,}}"                    # huge exponents: 10^{1000000000}
                        rf"|[)}}]\s*{_POW}\d{{3,}}"             # big powers of compound bases: (x+1)^{5000}
                        r"|[)}]\s*!|\d{6,}\s*!|!\s*!")         # factorials: (10^{10})!, 1000000!, 10!!!
_UNICODE = {"\u2212": "-", "\u00b0": "^\\circ", "\u00d7": "\\times "}


def answers_match(predicted: str, reference: str) -> bool:
    """True when `predicted` states the same final answer as `reference`; never raises."""
    try:
        return _match(predicted, reference)
    except (Exception, TimeoutException):
        return False


def _match(predicted: str, reference: str) -> bool:
    if not isinstance(predicted, str) or not isinstance(reference, str):
        return False
    pred_plain, ref_plain = _plain(predicted), _plain(reference)
    if not pred_plain or not ref_plain or max(len(predicted), len(reference)) > _MAX_MATH_LEN:
        return pred_plain == ref_plain != ""
    ref_choice = _CHOICE.fullmatch(ref_plain)
    if ref_choice:
        return _choice_letter(pred_plain) == ref_choice.group(1)
    if pred_plain == ref_plain:
        return True
    if _WORDS.fullmatch(pred_plain) or _WORDS.fullmatch(ref_plain):
        return False
    (pred_value, pred_unit), (ref_value, ref_unit) = _split_unit(predicted), _split_unit(reference)
    if pred_unit and ref_unit and pred_unit != ref_unit:
        return False
    if _EXPLOSIVE.search(pred_value) or _EXPLOSIVE.search(ref_value):
        return False
    timeout = _timeout_s()
    gold, target = _parse(ref_value, timeout), _parse(pred_value, timeout)
    return bool(gold and target) and verify(list(gold), list(target), timeout_seconds=timeout)


def _timeout_s() -> int | None:
    """math_verify's SIGALRM timeout: main thread only, and not when the caller already has an alarm pending
    (math_verify cancels any pending alarm when it finishes, e.g. pytest-timeout's)."""
    if os.name != "posix" or threading.current_thread() is not threading.main_thread():
        return None
    return None if signal.getitimer(signal.ITIMER_REAL)[0] > 0 else _TIMEOUT_S


def _plain(text: str) -> str:
    """Lower-case text with $ signs, \\text{} wrappers, a trailing period and repeated spaces removed."""
    s = text.replace("$", "")
    for _ in range(3):
        s = _TEXT_WRAP.sub(r"\1", s)
    return re.sub(r"\s+", " ", s.strip().rstrip(".").strip().lower())


def _choice_letter(plain: str) -> str | None:
    m = _CHOICE.fullmatch(plain) or _CHOICE_WITH_TEXT.fullmatch(plain)
    return next((g for g in m.groups() if g), None) if m else None


def _split_unit(text: str) -> tuple[str, str]:
    """(value, canonical unit or ''): the unit is split off only when what precedes it is a plain number."""
    s = text.replace("$", "").strip().rstrip(".").strip()
    for char, latex in _UNICODE.items():
        s = s.replace(char, latex)
    m = _UNIT_TAIL.search(s)
    if m is None:
        return s, ""
    value = s[:m.start()].strip()
    if not re.search(r"\d", value) or re.search(r"[A-Za-z]", _LATEX_CMD.sub("", value)):
        return s, ""
    unit = _UNIT_NOISE.sub("", m.group("unit")).lower()
    return value, unit[:-1] if len(unit) > 2 and unit.endswith("s") else unit


@lru_cache(maxsize=4096)
def _parse(text: str, timeout: int | None) -> tuple:
    return tuple(parse(f"\\boxed{{{text}}}", list(_EXTRACTION), parsing_timeout=timeout))
