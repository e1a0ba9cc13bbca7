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
