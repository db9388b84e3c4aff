"""Policies and trainers: the LAMaS controller, LAMaS/MaAS objectives, static baselines, the experiment."""
