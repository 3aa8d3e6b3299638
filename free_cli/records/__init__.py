"""Records: JSONL input with line numbers, prompts from task templates, JSONL output and resume,
shards over processes, and the stream that turns records into outputs in input order."""
