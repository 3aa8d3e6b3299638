"""Thresholds: FREE's Beta-mixture estimator, Learn-then-Test, offline calibration and the
per-dataset store. Imports decoding and the base modules."""
