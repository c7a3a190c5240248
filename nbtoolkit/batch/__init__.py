"""Batch APIs: the same endpoints written to a JSONL file, uploaded, and read back."""
