"""Endpoints: how rows become a request body and how a reply becomes row results.

One module per wire format: ``_base`` (chat completions and the protocol every endpoint follows),
``_structured`` (typed answers to a schema, with re-asks), ``_embeddings`` (vectors),
``_anthropic`` (Anthropic's Messages API), ``_gemini`` (the Gemini API; ``_gemini_schema``
translates a schema to its form). ``_providers`` picks the endpoint per method and provider.
"""
