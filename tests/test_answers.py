from concurrent.futures import ThreadPoolExecutor

import pytest

from papo_engine.answers import answers_match
from papo_engine.rewards import accuracy_format_reward

# (predicted, reference)
EQUIVALENT = [
    # fractions, decimals, LaTeX
    ("1/2", "0.5"), ("\\frac{1}{2}", "0.5"), ("0.5", "\\frac{1}{2}"), ("\\dfrac12", "1/2"), ("$\\frac{1}{2}$", "1/2"),
    ("2\\sqrt{2}", "\\sqrt{8}"), ("\\sqrt{2}/2", "\\frac{\\sqrt2}{2}"), ("x^2+2x", "x(x+2)"), ("x - y", "-y+x"),
    ("3 \\times 10^2", "300"), ("0.333333", "1/3"),
    # plain numbers: negatives, trailing zeros, thousands separators, unicode minus
    ("-\\frac{1}{2}", "-0.5"), ("-3", "-3.0"), ("\u22123", "-3"), ("3.0", "3"), ("+4", "4"),
    ("1,000", "1000"), ("1000", "1,000"), ("1,000,000", "1000000"), ("12,345.6", "12345.6"),
    # percentages (math_verify reads 50% as 50/100 and also accepts the bare 50)
    ("50\\%", "0.5"), ("50%", "1/2"), ("50\\%", "50"),
    # units and degrees
    ("3 cm", "3"), ("3cm", "3"), ("3\\text{ cm}", "3"), ("5 m^2", "5"), ("5\\ \\text{m}^2", "5"),
    ("5\\,\\mathrm{m}^{2}", "5 m^2"), ("\\frac{1}{2} \\text{ cm}", "0.5"), ("20 km/h", "20"), ("30^\\circ", "30"),
    ("30^{\\circ}", "30"), ("30\u00b0", "30"), ("30 degrees", "30"), ("3 \\text{ apples}", "3"),
    # sets, intervals, equations
    ("\\{1,2\\}", "\\{2,1\\}"), ("2, 1", "1, 2"), ("[1,2)", "[1, 2)"), ("(1,2]", "(1, 2]"), ("x = 3", "3"),
    ("(-\\infty, 2)", "x<2"),
    # words
    ("Red", "red"), ("red.", "red"), (" red ", "red"), ("\\text{Red}", "red"), ("$red$", "red"),
    ("light  Blue", "light blue"),
    # multiple choice
    ("(B)", "B"), ("B", "B"), ("B.", "B"), ("b", "B"), ("Option B", "B"), ("\\text{(B)}", "B"), ("(B) 12", "B"),
    ("B) 12", "B"), ("B", "(B)"), ("(B)", "b"),
]

NOT_EQUIVALENT = [
    ("1/2", "0.2"), ("\\frac{1}{3}", "0.5"), ("0.333", "1/3"), ("-3", "3"), ("-\\infty", "\\infty"),
    ("2x", "3x"), ("2x+3", "2x+3t"), ("x - y", "y - x"), ("\\pi", "3.14"), ("3 or 4", "4"), ("3, 4", "4"),
    ("4", "\\pm 2"), ("1, 000", "1000"), ("50%", "5"),
    ("3 cm", "4"), ("3 red", "3 blue"), ("2 x", "2"), ("2 i", "2"), ("2 pi", "2"),
    ("[1,2)", "(1,2]"), ("\\{1,2\\}", "\\{1,3\\}"),
    ("red", "blue"), ("red", "der"), ("red", "erd"), ("abc", "cba"), ("three", "3"), ("red", "3"),
    ("A", "B"), ("(A)", "B"), ("Option C", "B"), ("2", "B"), ("B", "2"), ("(B)", "2"), ("B and C", "B"),
    ("", "3"), ("3", ""), ("", ""), ("   ", "red"), ("$$", "1"),
    ("\\frac{1}{", "1"), ("}}}{{{", "1"), ("\\boxed{", "1"),
]


@pytest.mark.parametrize("predicted, reference", EQUIVALENT)
def test_equivalent(predicted, reference):
    assert answers_match(predicted, reference)


@pytest.mark.parametrize("predicted, reference", NOT_EQUIVALENT)
def test_not_equivalent(predicted, reference):
    assert not answers_match(predicted, reference)


def test_table_size():
    assert len(EQUIVALENT) >= 30 and len(NOT_EQUIVALENT) >= 15


@pytest.mark.parametrize("predicted", [
    "x" * 200_000, "{" * 10_000, "\\frac{" * 2_000, "3 " + "ab " * 50_000,
    "10^{10^{10}}", "9^{9^9}", "10^{1000000000}", "(x+1)^{5000}", "(10^{10})!", "10!!!",
    None, 3,
])
@pytest.mark.timeout(60, method="thread")
def test_hostile_inputs_return_false(predicted):
    assert answers_match(predicted, "1") is False


def test_identical_long_answers_still_match():
    assert answers_match("a " * 1000, "A " * 1000)


@pytest.mark.timeout(120, method="thread")
def test_worker_threads_agree_with_the_main_thread():
    """math_verify's SIGALRM timeouts only work in the main thread; elsewhere they must be off, not raise."""
    pairs = EQUIVALENT + NOT_EQUIVALENT + [("10^{10^{10}}", "1"), ("(x+1)^{5000}", "x+1")]
    expected = [answers_match(p, r) for p, r in pairs]
    with ThreadPoolExecutor(max_workers=2) as pool:
        assert list(pool.map(lambda pr: answers_match(*pr), pairs)) == expected


def test_repeated_calls_are_stable():
    assert all(answers_match("\\frac{1}{2}", "0.5") for _ in range(50))
    assert not any(answers_match("red", "erd") for _ in range(50))


@pytest.mark.parametrize("response, answer, acc", [
    ("<think>half of it</think> The answer is \\boxed{\\frac{1}{2}}", "0.5", 1.0),
    ("<think>...</think> So \\boxed{0.5}.", "\\frac{1}{2}", 1.0),
    ("<think>...</think> \\boxed{\\text{(B)}}", "B", 1.0),
    ("<think>...</think> \\boxed{C}", "B", 0.0),
    ("<think>...</think> \\boxed{3 \\text{ cm}}", "3", 1.0),
    ("<think>...</think> \\boxed{4 \\text{ cm}}", "3", 0.0),
    ("<think>...</think> \\boxed{Red}", "red", 1.0),
    ("<think>...</think> \\boxed{erd}", "red", 0.0),
    ("<think>...</think> \\boxed{1,000}", "1000", 1.0),
    ("<think>...</think> \\boxed{3 or 4}", "4", 0.0),
    ("<think>...</think> <answer>0.5</answer>", "1/2", 1.0),          # no box: the answer tag counts
    ("<think>...</think> \\boxed{\\frac{1}{2}", "0.5", 0.0),           # unclosed box: nothing extracted
])
def test_accuracy_format_reward_end_to_end(response, answer, acc):
    out = accuracy_format_reward(response, answer)
    assert out["accuracy"] == acc
    assert out["reward"] == pytest.approx(0.9 * acc + 0.1 * out["format"])
