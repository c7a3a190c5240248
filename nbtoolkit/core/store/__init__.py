"""What outlives a run: the response cache (SQLite), its vectors file and batch-job records."""
