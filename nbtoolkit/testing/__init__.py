"""Test servers with scripted misbehaviour: OpenAI-compatible (`ChatServer`), Anthropic's
Messages API (`AnthropicServer`) and the Gemini API (`GeminiServer`), on one machinery
(`ScriptedServer`: scripts, faults, rate limits, counters, records). The official anthropic
and google-genai SDKs read the last two as they read the real APIs (tests/test_provider_servers.py).

It is a real aiohttp server on 127.0.0.1 (the OS picks the port), so the code under test
goes through its whole HTTP stack. It answers ``POST {base_url}/chat/completions`` and
``GET {base_url}/models`` (and ``POST {base_url}/embeddings``, see `EmbeddingBehaviour`),
records what it saw, and can be told to fail::

    from nbtoolkit.testing import ChatServer, Reset, Status

    async def test_retries_a_429() -> None:
        async with ChatServer(latency=0.01) as server:
            server.script(Status(429, retry_after=0.1), Reset(), prompt="hi")
            ...  # call server.base_url; "hi" gets a 429, then a dropped connection, then a reply
            assert server.answered["hi"] == 1
            assert server.peak_in_flight <= 4

    def test_sync_entry_point() -> None:
        with ChatServer().run_in_thread() as server:  # its own thread and event loop
            ...

A request takes the first queued action for its prompt (the content of the last user
message), else the first action queued for any prompt, else ``Reply()``, unless `FaultRates`
picks a fault for it. Fault picks hash (seed, prompt, attempt number), so the Nth attempt at a
prompt meets the same fate whatever order concurrent requests arrive in.

With a `RateLimit`, a request first draws from OpenAI-style token buckets as it arrives; one
that finds them short gets a 429 and takes no action and no attempt number, so faults stay
reproducible however the limiter interleaves.
"""

from nbtoolkit.testing._actions import Echo, FaultRates, Malformed, Reply, Reset, Stall, Status
from nbtoolkit.testing._anthropic import AnthropicServer
from nbtoolkit.testing._batch import BatchBehaviour
from nbtoolkit.testing._embeddings import EmbeddingBehaviour, expected_vector
from nbtoolkit.testing._gemini import GeminiServer
from nbtoolkit.testing._lengths import CompletionLengths
from nbtoolkit.testing._ratelimit import HEADER_FAMILIES, HeaderFamily, RateLimit, duration
from nbtoolkit.testing._scripted import RecordedRequest, ScriptedServer
from nbtoolkit.testing._semantic import SemanticRules
from nbtoolkit.testing._server import ChatServer
from nbtoolkit.testing._structured import LLAMA_CPP_REFUSAL, StructuredFaults, schema_instance

__all__ = [
    "HEADER_FAMILIES",
    "LLAMA_CPP_REFUSAL",
    "AnthropicServer",
    "BatchBehaviour",
    "ChatServer",
    "CompletionLengths",
    "Echo",
    "EmbeddingBehaviour",
    "FaultRates",
    "GeminiServer",
    "HeaderFamily",
    "Malformed",
    "RateLimit",
    "RecordedRequest",
    "Reply",
    "Reset",
    "ScriptedServer",
    "SemanticRules",
    "Stall",
    "Status",
    "StructuredFaults",
    "duration",
    "expected_vector",
    "schema_instance",
]
