"""A reward function for tests: NaN reward for every response (a broken user reward)."""


def nan_reward(response: str, answer: str) -> dict:
    return {"reward": float("nan"), "accuracy": 0.0}
