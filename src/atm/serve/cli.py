"""``atm serve``: serve registry models through an OpenAI- and Ollama-compatible API."""

from __future__ import annotations

import argparse
import os
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import socket

EPILOG = """examples:
  atm serve --model atm:q8
  atm serve --model atm:q8 --model atm:q4 --port 8000 --api-key $ATM_API_KEY
  atm serve --config serve/default.yaml --set parallel=4
  atm serve --model mine=runs/x-merged --engine transformers
  atm serve --model mine=runs/x-merged --engine vllm   # $ATM_VLLM, a vllm on PATH, or `atm doctor --vllm`'s
  atm serve --model gpt=http://127.0.0.1:11434 --engine remote --set models.0.upstream_api=ollama

then:
  curl http://127.0.0.1:8000/v1/models
  curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
       -d '{"model": "atm:q8", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 16}'
  OLLAMA_HOST=127.0.0.1:8000 python -c "import ollama; print(ollama.list())"

--model takes a registry name (atm:q8), NAME=PATH (a GGUF file or HF dir), a bare PATH, or
NAME=http://... (a remote OpenAI-compatible server, with --engine remote)."""


def register(p: argparse.ArgumentParser) -> None:
    from atm.cli import add_config_args

    p.epilog = EPILOG
    p.add_argument("--model", action="append", default=[], metavar="NAME",
                   help="model to serve (repeatable): atm:q8, NAME=PATH, PATH or NAME=URL")
    from atm.serve.engines import ENGINES

    p.add_argument("--engine", choices=list(ENGINES), default=None,
                   help="engine for the models (default from the config: llama-server)")
    p.add_argument("--host", default=None, help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=None, help="port (default 8000)")
    p.add_argument("--api-key", default=None,
                   help="require `Authorization: Bearer KEY` (default: $ATM_API_KEY; unset = open)")
    p.add_argument("--parallel", type=int, default=None, help="engine slots per model (default 8)")
    p.add_argument("--ctx-size", type=int, default=None, help="context per slot in tokens (default 2048)")
    add_config_args(p)
    p.set_defaults(func=run)


def load_settings(args: argparse.Namespace):
    """Config file, then --model / flags, then --set (so `--set models.0.upstream_api=ollama`
    refines a model given with --model)."""
    from atm.config import load_yaml, parse_override, validate
    from atm.serve.models import parse_model_arg
    from atm.serve.settings import ServeSettings

    data = load_yaml(args.config) if args.config else {}
    if args.model:
        data["models"] = [parse_model_arg(m).model_dump(exclude_defaults=True) for m in args.model]
    for key in ("engine", "host", "port", "api_key", "parallel", "ctx_size"):
        v = getattr(args, key, None)
        if v is not None:
            data[key] = v
    set_keys = []
    for item in args.overrides:
        k, v = parse_override(item)
        _set_path(data, k, v)
        set_keys.append(k)
    return validate(ServeSettings, data, source=args.config or "atm serve", set_keys=set_keys)


def _set_path(data: dict, key: str, value) -> None:
    """``a.b=v`` like atm.config.set_dotted, plus list indices: ``models.0.upstream_api=ollama``."""
    from atm.errors import ConfigError

    parts = key.split(".")
    node = data
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"--set {key}: {part!r} is not an index of a list of {len(node)}")
            if last:
                node[int(part)] = value
            else:
                node = node[int(part)]
            continue
        if last:
            node[part] = value
        else:
            if not isinstance(node.get(part), (dict, list)):
                node[part] = {}
            node = node[part]


def preflight(settings) -> socket.socket:
    """Everything that can be checked before an engine starts, each failure one line (AtmError):
    the llama-server binary (when an engine needs it), every configured klines file (``--set
    klines.SYM=PATH``) reads as a klines parquet, and the address is free. Returns the bound, listening socket (handed to uvicorn: no race for the port)."""
    import errno
    import socket

    from atm.errors import AtmError
    from atm.serve.advice import load_klines

    if any((m.engine or settings.engine) == "llama-server" for m in settings.models):
        from atm.runtime.llama_server import binary

        binary()  # not found: one line naming `atm doctor --build`, not a traceback after the bind
    for sym, path in settings.klines.items():
        try:
            df = load_klines(path)  # read once; /v1/advice reuses it
        except AtmError as exc:
            raise AtmError(f"klines.{sym}: {exc}") from None
        except Exception as exc:  # noqa: BLE001 - a parquet the reader cannot parse is the user's file
            raise AtmError(f"klines.{sym}: {path}: not a klines parquet ({type(exc).__name__}: {exc})") from None
        if not len(df):
            raise AtmError(f"klines.{sym}: {path}: has no bars")
    try:
        infos = socket.getaddrinfo(settings.host, settings.port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise AtmError(f"--host {settings.host}: not an address this machine can bind ({exc.strerror})") from None
    family, kind, proto, _, addr = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: TIME_WAIT is no conflict
    try:
        sock.bind(addr)
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        hint = " (another server is running there: pick another --port)" if exc.errno == errno.EADDRINUSE else ""
        raise AtmError(f"cannot listen on {settings.host}:{settings.port}: {exc.strerror}{hint}") from None
    sock.set_inheritable(True)
    return sock


def run(args: argparse.Namespace) -> int:
    from atm.errors import AtmError, require

    settings = load_settings(args)
    if not settings.models:
        raise AtmError("no model to serve: give --model atm:q8 (see `atm models list`) or a --config "
                       "with `models:`")
    require("fastapi", "serve")
    uvicorn = require("uvicorn", "serve")
    from atm.serve.app import create_app

    app = create_app(settings)  # resolves the models (an unknown one is refused here)
    sock = preflight(settings)  # before any engine starts
    port = sock.getsockname()[1]
    url = f"http://{settings.host if ':' not in settings.host else f'[{settings.host}]'}:{port}"
    key = settings.resolved_api_key()
    if settings.host not in ("127.0.0.1", "localhost", "::1") and not key:
        print(f"atm serve: warning: binding {settings.host} without an API key: anyone who can reach "
              "this port can use the models", file=sys.stderr)
    names = ", ".join(m.name for m in settings.models)
    print(f"atm serve: starting {names} ({settings.engine}) on {url}"
          f"{' (API key required)' if key else ''}", file=sys.stderr, flush=True)
    kw = {}
    try:
        import uvloop  # noqa: F401

        kw["loop"] = "uvloop"
    except ImportError:
        pass
    try:
        import httptools  # noqa: F401

        kw["http"] = "httptools"
    except ImportError:
        pass
    config = uvicorn.Config(app, host=settings.host, port=port, log_level=settings.log_level,
                            access_log=settings.log_level == "debug", timeout_graceful_shutdown=10,
                            **kw)

    class Server(uvicorn.Server):
        async def startup(self, sockets=None):
            await super().startup(sockets=sockets)
            if not self.should_exit:
                print(f"atm serve: ready at {url} (models: {names}; API docs at {url}/docs; "
                      f"Ctrl-C stops)", file=sys.stderr, flush=True)

    server = Server(config)
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
    # uvicorn exits quietly when the lifespan (engine start) fails; say so with a non-zero code
    if not getattr(server, "started", False):
        print("atm serve: did not start (see the error above)", file=sys.stderr)
        return 1
    return 0


if os.environ.get("ATM_DEBUG") == "1":  # pragma: no cover
    import faulthandler

    faulthandler.enable()
