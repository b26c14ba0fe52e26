"""Reward functions for tests that break the interface (fn(response, answer) -> dict with a 'reward' number)."""


def returns_a_float(response: str, answer: str):
    return 1.0


def returns_no_reward(response: str, answer: str) -> dict:
    return {"accuracy": 1.0}


def returns_a_word(response: str, answer: str) -> dict:
    return {"reward": 1.0, "verdict": "right"}


def raises(response: str, answer: str) -> dict:
    return {"reward": 1.0 / (len(answer) - len(answer))}
