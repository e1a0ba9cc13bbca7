"""The learner: one DeepSpeed rank (rank.py), the group of W ranks behind one handle (group.py), the
DeepSpeed config (ds_config.py), the multi-rank loss normaliser (normaliser.py) and the exact merging of
statistics over micro-batches and ranks (metrics.py)."""
