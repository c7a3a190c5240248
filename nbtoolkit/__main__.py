"""``python -m nbtoolkit demo``: label a dozen sample reviews with a real model, no key needed.

Without ``OPENAI_API_KEY`` the demo starts the local model (the ``local`` extra: Gemma 3 270M
on llama.cpp, on 127.0.0.1) and stops it at the end. With a key it asks that API instead
(``OPENAI_BASE_URL`` or OpenAI), unless ``--local`` is given. It says which it uses.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from collections.abc import Sequence
from typing import Any

import pandas as pd

import nbtoolkit
from nbtoolkit.config import masked_url
from nbtoolkit.local import (
    REVIEW_FIELDS,
    REVIEW_FIELDS_TEMPLATE,
    SENTIMENT_TEMPLATE,
    LocalServer,
    sample_reviews,
)

REMOTE_MODEL = "gpt-4o-mini"
# Rows the typed extraction runs on: a grammar-constrained answer takes the local model
# seconds, and a few rows show the point.
TYPED_ROWS = 3


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m nbtoolkit",
        description="nbtoolkit from the command line. 'demo' labels a dozen sample reviews with "
        "a real model: the local one (no key needed), or the API of OPENAI_API_KEY when set.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo = commands.add_parser(
        "demo", help="label the sentiment of sample reviews with a real model"
    )
    demo.add_argument("--rows", type=int, default=None, help="only the first ROWS reviews")
    demo.add_argument(
        "--max-parallel", type=int, default=4, help="requests in flight at once (default 4)"
    )
    demo.add_argument(
        "--local", action="store_true", help="use the local model even if OPENAI_API_KEY is set"
    )
    demo.add_argument(
        "--model", default=None, help=f"with a key: the model (default {REMOTE_MODEL})"
    )
    args = parser.parse_args(argv)
    try:
        return _demo(args)
    except nbtoolkit.NbToolkitError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _demo(args: argparse.Namespace) -> int:
    frame = sample_reviews()
    if args.rows is not None:
        frame = frame.head(args.rows)
    config = nbtoolkit.ChatConfig().resolved()
    with contextlib.ExitStack() as stack:
        if config.api_key and not args.local:
            model, base_url = args.model or REMOTE_MODEL, str(config.base_url)
            shown = masked_url(base_url)  # a gateway's key may be in the query
            print(f"OPENAI_API_KEY is set: asking {model} at {shown} (--local: the local model)")
        else:
            why = "--local given" if config.api_key else "no OPENAI_API_KEY"
            print(f"{why}: starting the local model (Gemma 3 270M on llama.cpp, 127.0.0.1) ...")
            started = time.monotonic()
            server = stack.enter_context(LocalServer())
            model, base_url = server.model, server.base_url
            print(f"ready at {base_url} in {time.monotonic() - started:.1f} s")
        print(f"labelling {len(frame)} reviews with a few-shot prompt, temperature 0:")
        try:
            out = frame.chat.complete(
                template=SENTIMENT_TEMPLATE,
                model=model,
                base_url=base_url,
                output="sentiment",
                max_parallel=args.max_parallel,
                temperature=0,
                max_tokens=3,
                stop=["\n"],
                cache=False,  # a demo shows real requests, not answers saved by an earlier run
            )
        except (nbtoolkit.RunAborted, nbtoolkit.RunInterrupted) as exc:
            _show(exc.partial)
            print(f"{type(exc).__name__}: {exc}", file=sys.stderr)
            return 130 if isinstance(exc, KeyboardInterrupt) else 1
        _show(out)
        rows = min(TYPED_ROWS, len(out))
        print(f"\nthe same reviews as typed columns (df.chat.extract), first {rows}:")
        try:
            typed = out.head(rows).chat.extract(
                template=REVIEW_FIELDS_TEMPLATE,
                schema=REVIEW_FIELDS,
                prefix="json_",
                model=model,
                base_url=base_url,
                max_parallel=args.max_parallel,
                temperature=0,
                max_tokens=40,
                cache=False,
            )
        except (nbtoolkit.RunAborted, nbtoolkit.RunInterrupted) as exc:
            print(f"{type(exc).__name__}: {exc}", file=sys.stderr)
            return 130 if isinstance(exc, KeyboardInterrupt) else 1
    _show_typed(typed)
    return 0


def _show_typed(frame: pd.DataFrame) -> None:
    """The free-text label beside the typed fields, and the fields' dtypes."""
    fields = [name for name in frame.columns if str(name).startswith("json_")]
    labels = frame["sentiment"].map(lambda s: s.strip() if isinstance(s, str) else s)
    shown = frame.assign(sentiment=labels)[["product", "sentiment", *fields]]
    with pd.option_context("display.max_colwidth", 60, "display.width", 120):
        print(shown.to_string(index=False))
    print("dtypes: " + ", ".join(f"{name} {frame[name].dtype}" for name in fields))
    report = nbtoolkit.last_run()
    if report is not None:
        print(report.summary())


def _show(frame: Any) -> None:
    if isinstance(frame, pd.DataFrame):
        # The model answers " positive": the space belongs to its word, not to the label.
        labels = frame["sentiment"].map(lambda s: s.strip() if isinstance(s, str) else s)
        with pd.option_context("display.max_colwidth", 60, "display.width", 120):
            print(frame.assign(sentiment=labels).to_string())
    report = nbtoolkit.last_run()
    if report is not None:
        print(report.summary())


if __name__ == "__main__":
    sys.exit(main())
