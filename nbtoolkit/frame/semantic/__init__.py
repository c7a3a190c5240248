"""Semantic operators over a whole frame: ``filter``, ``join``, ``top_k`` and ``aggregate``.

Each is a few runs of the one engine (its endpoints, cache, budgets and stop button) put
together: a filter is yes/no questions, a join embeds both sides first and asks only about
the nearest pairs, top_k scores each row once, and aggregate reduces chunks that fit the
model's context into answers of answers. Each stage's answers are cached, so a re-run, or a
run over a frame that changed in a few rows, pays only for what is new.
"""
