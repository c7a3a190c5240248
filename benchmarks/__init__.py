"""Benchmarks for the README: nbtoolkit against the clients people write by hand.

Run ``python -m benchmarks`` (``--quick`` for a smoke run, ``--only SCENARIO`` for one). Each
run of a client gets a fresh server process (`benchmarks.serve`) and a fresh client process
(`benchmarks.child`), so neither's CPU, memory or warm state leaks into another's figures;
the parent (`benchmarks.harness`) only starts them and collects what they report. Every
request goes to 127.0.0.1. Never run as tests.

    __main__.py   the command line: which scenarios, how many repetitions, where to write
    scenarios.py  the workloads, their server options and the targets nbtoolkit must meet
    clients.py    floor, recipe, openai, pool, nbtoolkit and engine: one function each
    child.py      one client over one workload in this process: wall, CPU, RSS, rows right
    serve.py      a ChatServer in its own process, driven over stdin
    harness.py    one repetition: start the server, run the child, ask the server what it saw
    report.py     medians, the Markdown tables and the JSON
"""
