"""`rosetool serve`: the bundled runtime behind an OpenAI-compatible HTTP API.

Only `app` imports FastAPI; the other modules stay importable without the HTTP stack, so
`rosetool generate --chat` can share the chat-template code.
"""
