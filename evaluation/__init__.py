"""Offline evaluation on a temporal split: the two-tower model (through its served artifacts) vs baselines."""
