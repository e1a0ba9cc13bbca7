"""Prompts and the prompt stream (prompt.py), the built-in arith task (arith.py), datasets in veRL's
schema (verl.py), and which of them a run uses (tasks.py)."""
