"""What one client may cost the server: body size, prompt length, time to send a request, connections.

A server that tokenises whatever arrives and waits forever for headers can be starved by one client: a
50 MB prompt took 10 GB and 86 s to refuse, and 1,100 half-sent requests left `/health` unanswered. Each
bound fails the offending client alone, early and in OpenAI's error shape: 413 for a body over
`max_body_bytes` (from Content-Length, before it is read, or while reading a chunked one), 400 for a
prompt over `max_prompt_chars` (before it is tokenised), 408 when headers or body stall for
`header_timeout_s`, 503 beyond `max_connections` open connections. The guards that enforce them are in
`guards.py`; this module imports nothing heavy, so the CLI can name the defaults.
"""

from __future__ import annotations

from dataclasses import dataclass

from rosetool.errors import RosetoolError


@dataclass(frozen=True)
class ServeLimits:
    max_body_bytes: int = 4 << 20        # a 128k-token prompt is ~0.5 MB of text, ~1 MB as token ids
    max_prompt_chars: int = 1_000_000    # tokenising this much takes well under a second
    header_timeout_s: float = 10.0
    max_connections: int = 1024

    def check(self) -> None:
        for name in ("max_body_bytes", "max_prompt_chars", "max_connections"):
            if getattr(self, name) < 1:
                raise RosetoolError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if not self.header_timeout_s > 0:
            raise RosetoolError(f"--header-timeout must be > 0, got {self.header_timeout_s}")


