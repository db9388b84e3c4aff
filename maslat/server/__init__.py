"""The stand-in vLLM server (``maslat serve``): a simulated pool behind vLLM's OpenAI-compatible HTTP API.

Needs the ``server`` extra (aiohttp), imported only when a server is built.
"""
