import pytest

from papo_engine.answers import answers_match
from papo_engine.rewards import accuracy_format_reward, extract_answer, extract_boxed, format_ok, load_reward_fn
from papo_engine.config import ConfigError


@pytest.mark.parametrize("text, expected", [
    ("<think>x</think>\\boxed{red}", "red"),
    ("\\boxed{1} then \\boxed{2}", "2"),                     # the last box counts
    ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),               # nested braces
    ("\\boxed{unclosed", None),
    ("no answer here", None),
    ("<answer> blue </answer>", " blue "),
    ("<answer>a</answer> and \\boxed{b}", "b"),              # boxed wins over tags
    ("", None),
])
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_extract_boxed_empty_box():
    assert extract_boxed("\\boxed{}") == ""


@pytest.mark.parametrize("a, b, same", [
    ("Red", "red", True), (" red. ", "red", True), ("$3$", "3", True), ("3.0", "3", True),
    ("(B)", "b", True), ("\\text{green}", "green", True), ("1,000", "1000", True),
    ("red", "blue", False), ("3", "4", False), ("0.5", "1/2", True),    # values compare mathematically now
])
def test_answers_match(a, b, same):
    assert answers_match(a, b) is same


@pytest.mark.parametrize("response, answer, reward, acc, fmt", [
    ("<think>look</think>\\boxed{red}", "red", 1.0, 1.0, 1.0),
    ("<think>look</think>\\boxed{blue}", "red", 0.1, 0.0, 1.0),
    ("\\boxed{red}", "red", 0.9, 1.0, 0.0),                   # right answer, no think block
    ("<think>look</think>red", "red", 0.0, 0.0, 0.0),         # no box: nothing extracted
    ("<think>look\\boxed{red}", "red", 0.9, 1.0, 0.0),        # unclosed think
    ("", "red", 0.0, 0.0, 0.0),
])
def test_accuracy_format_reward(response, answer, reward, acc, fmt):
    out = accuracy_format_reward(response, answer)
    assert out["reward"] == pytest.approx(reward) and out["accuracy"] == acc and out["format"] == fmt


def test_weights_are_respected():
    out = accuracy_format_reward("<think>a</think>\\boxed{red}", "red", accuracy_weight=0.5, format_weight=0.5)
    assert out["reward"] == pytest.approx(1.0)
    assert format_ok("  <think>a</think> \\boxed{x} ")


def test_load_reward_fn():
    assert load_reward_fn("papo_engine.rewards.accuracy_format_reward") is accuracy_format_reward
    with pytest.raises(ConfigError, match="reward.function='no.such.fn'"):
        load_reward_fn("no.such.fn")
