"""Training: losses with the dynamic layer mapping, training examples, the methods (exit-only,
shallow-deep, calm, meta) and the resumable trainer."""
