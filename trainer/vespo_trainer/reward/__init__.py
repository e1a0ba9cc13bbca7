"""Reward scoring: the process pool with a time limit per call and its Ray actor (pool.py), and the
built-in math-verify reward (math_reward.py). The arith task's verifier is data/arith.py's."""
