"""Tuning: the search space from config, the resource plan, and the Tune driver."""
