"""Evaluation: scoring outputs (quality, consistency, speed) and `free bench`."""
