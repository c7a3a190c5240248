"""The pandas face: ``df.chat`` / ``series.chat`` methods, their options, writers and reports."""
