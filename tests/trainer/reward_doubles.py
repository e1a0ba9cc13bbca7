"""Test doubles for the reward pool: reward functions that misbehave on purpose."""
import signal
import time


def hang(prompt, response, truth):
    if response == "hang":
        while True:
            time.sleep(0.05)
    return 1.0 if response == truth else 0.0


def busy(prompt, response, truth):
    if response == "hang":
        x = 0
        while True:  # pure-Python busy loop
            x += 1
    return 1.0


def boom(prompt, response, truth):
    if response == "boom":
        raise RuntimeError("reward function exploded")
    if response == "nan":
        return float("nan")
    if response == "text":
        return "not a number"
    return 1.0


def deaf(prompt, response, truth):
    """Ignores the per-call timer (as a call stuck in C code would): only the batch backstop can stop it."""
    signal.signal(signal.SIGALRM, signal.SIG_IGN)
    if response == "hang":
        time.sleep(3600)
    return 1.0


def verl_style(data_source, solution_str, ground_truth, extra_info=None):
    """veRL's signature; the score says which arguments arrived where."""
    ok = solution_str == ground_truth and data_source == "src" and (extra_info or {}).get("index") == 7
    return 1.0 if ok else 0.5


def verl_kwargs(solution_str, **kwargs):
    """veRL's signature through **kwargs, returning veRL's dict form."""
    return {"score": 1.0 if solution_str == kwargs["ground_truth"] else 0.0, "acc": True}


def math_then_hang(data_source, solution_str, ground_truth, extra_info=None):
    """Scores with the built-in math reward first (math-verify must not cancel the pool's timer), then hangs."""
    from vespo_trainer.reward.math_reward import compute_score

    score = compute_score(data_source, solution_str, ground_truth, extra_info)
    if "hang" in solution_str:
        while True:
            time.sleep(0.05)
    return score


def has_digit(data_source, solution_str, ground_truth, extra_info=None):
    """1 when the response contains a digit: a signal a random character-level policy gets half the time."""
    return float(any(c.isdigit() for c in solution_str))
