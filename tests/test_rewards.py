import pytest

from papo_engine.answers import answers_match
from papo_engine.rewards import (accuracy_format_reward, extract_answer, extract_boxed, format_ok, load_reward_fn,
                                 think_opened_format_reward)
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


@pytest.mark.parametrize("response, reward, fmt", [
    ("look at it</think>\\boxed{red}", 1.0, 1.0),            # the template opened <think>: closed, then boxed
    ("<think>look</think> so \\boxed{red}.", 1.0, 1.0),      # a response that opens it itself
    ("look < / think > \\boxed{red}", 1.0, 1.0),             # spaces around <, > and / removed (the authors')
    ("look \\boxed{red}", 0.9, 0.0),                         # never closed
    ("look</think>\\boxed{blue}", 0.1, 1.0),
])
def test_think_opened_format_reward_is_the_authors_qwen3_format(response, reward, fmt):
    out = think_opened_format_reward(response, "red")
    assert out["reward"] == pytest.approx(reward) and out["format"] == fmt
    assert out["accuracy"] == accuracy_format_reward(response, "red")["accuracy"]


def test_weights_are_respected():
    out = accuracy_format_reward("<think>a</think>\\boxed{red}", "red", accuracy_weight=0.5, format_weight=0.5)
    assert out["reward"] == pytest.approx(1.0)
    assert format_ok("  <think>a</think> \\boxed{x} ")


def test_load_reward_fn():
    assert load_reward_fn("papo_engine.rewards.accuracy_format_reward") is accuracy_format_reward
    with pytest.raises(ConfigError, match="reward.function='no.such.fn'"):
        load_reward_fn("no.such.fn")


# ----------------------------------------------------------------------------------------------------------
# issue 43, item 6: a reward function that breaks the interface is one line naming it, before the warm-up


@pytest.mark.parametrize("name, needle", [
    ("returns_a_float", "returned 1.0 (answer 'red', response '<think>"),
    ("returns_no_reward", "returned {'accuracy': 1.0} (answer 'red'"),
    ("returns_a_word", "returned verdict='right' (answer 'red'"),
    ("raises", "raised ZeroDivisionError: float division by zero (at "),
])
def test_a_broken_reward_function_is_one_line(name, needle):
    from papo_engine.config import Config
    from papo_engine.rewards import RewardRole
    cfg = Config()
    cfg.reward.function = f"tests.multiproc.bad_rewards.{name}"
    with pytest.raises(ConfigError) as err:
        RewardRole(cfg).check("red")
    message = str(err.value)
    assert message.startswith(f"reward.function='tests.multiproc.bad_rewards.{name}' ") and needle in message
    assert "\n" not in message
    if name == "raises":
        assert "bad_rewards.py:" in message  # where the user's code failed


@pytest.mark.slow  # builds the trainer in this process (~5 s)
def test_train_refuses_a_broken_reward_function_before_the_warm_up(tmp_path, capsys):
    from papo_engine.cli import main
    code = main(["train", f"trainer.output_dir={tmp_path}", "logging.wandb=false", "warmup.steps=2",
                 "reward.function=tests.multiproc.bad_rewards.returns_a_float"])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("papo:")]
    assert code == 2 and len(lines) == 1, err[-3000:]
    assert lines[0].startswith("papo: error: reward.function='tests.multiproc.bad_rewards.returns_a_float' returned")
    assert "warm-up" not in err and not (tmp_path / "metrics.jsonl").exists()
