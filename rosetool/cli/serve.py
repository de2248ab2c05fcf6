"""`rosetool serve`: the bundled runtime behind an OpenAI-compatible HTTP server."""

from __future__ import annotations

import asyncio
import errno
import logging
import signal
import socket
import sys
from pathlib import Path
from typing import Optional

import typer

from rosetool.errors import RosetoolError
from rosetool.serve.limits import ServeLimits

from .adapter_options import AdapterOpt


def listen_socket(host: str, port: int) -> socket.socket:
    """The server's listening socket, bound before anything slow happens."""
    if not 0 <= port <= 65535:
        raise RosetoolError(f"--port {port}: not a port number (0..65535)")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise RosetoolError(f"--host {host}: cannot resolve it ({exc.strerror})") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        why = "is already in use (another server?)" if exc.errno == errno.EADDRINUSE else f"cannot be bound ({exc.strerror})"
        raise RosetoolError(f"{host}:{port} {why}; choose another with --port") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def serve(
    model: Optional[str] = typer.Argument(None, help="Model folder (HF, native, Megatron) or cached hub id; "
                                                     "default: the embedded default model."),
    host: str = typer.Option("127.0.0.1", "--host"),
    port: int = typer.Option(8000, "--port"),
    served_model_name: Optional[str] = typer.Option(None, "--served-model-name",
                                                    help="The `model` clients send (default: MODEL as given)."),
    chat_template: Optional[Path] = typer.Option(None, "--chat-template",
                                                 help="Jinja file overriding the model's chat template."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="float32, float16 or bfloat16."),
    device: Optional[str] = typer.Option(None, "--device", help="cpu or cuda (default: cuda if available)."),
    max_num_seqs: int = typer.Option(256, "--max-num-seqs", help="Requests batched at once."),
    max_num_batched_tokens: int = typer.Option(8192, "--max-num-batched-tokens", help="Tokens per engine step."),
    block_size: int = typer.Option(16, "--block-size", help="Tokens per KV-cache block."),
    num_kv_blocks: Optional[int] = typer.Option(None, "--num-kv-blocks", help="KV pool size (default: from memory)."),
    max_model_len: Optional[int] = typer.Option(None, "--max-model-len", help="Longest prompt + output."),
    prefix_caching: bool = typer.Option(True, "--enable-prefix-caching/--no-enable-prefix-caching"),
    enforce_eager: bool = typer.Option(False, "--enforce-eager", help="No CUDA graphs."),
    tp: int = typer.Option(1, "--tp", min=1, help="Tensor-parallel ranks: the model is sharded over this many "
                           "processes (this one is rank 0 and serves HTTP)."),
    ep: int = typer.Option(1, "--ep", min=1, help="Expert-parallel ranks (MoE): whole experts placed on this "
                           "many processes, shared with --tp's."),
    max_body_bytes: int = typer.Option(ServeLimits.max_body_bytes, "--max-body-bytes",
                                       help="Largest request body; larger ones get 413."),
    max_prompt_chars: int = typer.Option(ServeLimits.max_prompt_chars, "--max-prompt-chars",
                                         help="Longest prompt (or chat messages) in characters, checked "
                                              "before tokenising; longer ones get 400."),
    header_timeout: float = typer.Option(ServeLimits.header_timeout_s, "--header-timeout",
                                         help="Seconds a client has to send its request headers (and each "
                                              "piece of its body); slower ones are dropped (408)."),
    max_connections: int = typer.Option(ServeLimits.max_connections, "--max-connections",
                                        help="Open connections at most; more get 503."),
    log_level: str = typer.Option("info", "--log-level", help="uvicorn log level."),
    adapter: Optional[list[str]] = AdapterOpt,
) -> None:
    """Serve MODEL over an OpenAI-compatible API (/v1/completions, /v1/chat/completions, /metrics).

    SIGTERM or Ctrl-C drains: running requests finish, new ones get 503, then the process exits.
    """
    limits = ServeLimits(max_body_bytes, max_prompt_chars, header_timeout, max_connections)
    limits.check()
    sock = listen_socket(host, port)   # a busy port fails now, not after the model has loaded
    import uvicorn

    from rosetool.converters.sources import resolve_source
    from rosetool.runtime import LLM
    from rosetool.serve.app import ServeState, create_app
    from rosetool.serve.chat_template import find_chat_template
    from rosetool.serve.guards import guarded_protocol, raise_open_file_limit

    if model is None:
        from rosetool.default_model import NAME, ensure_default_model

        model, name = str(ensure_default_model()), NAME
    else:
        name = model
    template = find_chat_template(resolve_source(model), chat_template)
    llm = LLM(model, dtype=dtype, device=device, max_num_seqs=max_num_seqs, adapters=tuple(adapter or ()),
              max_num_batched_tokens=max_num_batched_tokens, block_size=block_size, num_kv_blocks=num_kv_blocks,
              max_model_len=max_model_len, enable_prefix_caching=prefix_caching, enforce_eager=enforce_eager,
              tensor_parallel_size=tp, expert_parallel_size=ep)
    state = ServeState(llm, served_model_name or name, template, limits)
    logging.basicConfig(level=log_level.upper(), format="%(levelname)s %(name)s: %(message)s")

    class DrainingServer(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            state.draining = True
            super().handle_exit(sig, frame)

        async def shutdown(self, sockets=None) -> None:
            """Keep listening while running requests finish, so a new one gets the documented 503
            rather than a refused connection; then uvicorn's own shutdown."""
            state.draining = True
            while state.in_flight and not self.force_exit:
                await asyncio.sleep(0.05)
            await super().shutdown(sockets)

    raise_open_file_limit(max_connections)
    config = uvicorn.Config(create_app(state), log_level=log_level, access_log=False,
                            http=guarded_protocol(limits))
    # uvicorn re-raises SIGTERM once it has drained; by then the exit is clean, so say so (status 0).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        DrainingServer(config).run(sockets=[sock])
    finally:
        llm.close()    # tensor-parallel ranks exit with the server
