"""Decoding: the engine over a Hugging Face model's own layers and caches, the precision policy and
the row kernels, exits, confidence measures, pruning, sampling, drafts and their cost model, the
strategies (full, static, calm, free) and continuous batching. Imports only `errors` and `paths`."""
