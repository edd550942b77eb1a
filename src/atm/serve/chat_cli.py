"""``atm chat``: the Gradio page over market state (a client of a running ``atm serve``)."""

from __future__ import annotations

import argparse
import os

EPILOG = """examples:
  atm serve --model atm:q8 &                      # the API the page talks to
  atm chat --api http://127.0.0.1:8000 --model atm:q8 --klines runs/data/btcusdt-1m.parquet
  atm chat --api http://127.0.0.1:8000 --model atm:q8 --klines BTCUSDT-1m-2024-01-01.csv --port 7861

The page has no model in it: advice comes from the server's /v1/advice, chat from
/v1/chat/completions. Open the printed URL in a browser."""


def register(p: argparse.ArgumentParser) -> None:
    p.epilog = EPILOG
    p.add_argument("--api", default="http://127.0.0.1:8000", help="base URL of `atm serve`")
    p.add_argument("--model", required=True, help="served model name (atm:q8)")
    p.add_argument("--klines", required=True, help="klines parquet (atm data build) or Binance CSV")
    p.add_argument("--api-key", default=None, help="bearer key of the server (default $ATM_API_KEY)")
    p.add_argument("--host", default="127.0.0.1", help="address the page binds")
    p.add_argument("--port", type=int, default=7860, help="port of the page")
    p.add_argument("--start", type=int, default=None, help="row of the first minute shown (default: "
                   "the first with enough history)")
    p.add_argument("--bars", type=int, default=64, help="bars sent to /v1/advice per minute")
    p.add_argument("--chart-bars", type=int, default=60, help="bars drawn on the chart")
    p.add_argument("--horizon", type=int, default=1, help="minutes a followed advice is held (PnL)")
    p.add_argument("--fee", type=float, default=0.001, help="fee per side for the PnL (0.001 = 10 bps)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from atm.errors import AtmError, require

    require("gradio", "ui")
    require("plotly", "ui")
    from atm.serve.chat import ApiClient, Replay, ReplayConfig, build_page, load_klines

    key = args.api_key or os.environ.get("ATM_API_KEY")
    client = ApiClient(args.api, args.model, api_key=key)
    try:
        served = client.models()
    except Exception as exc:  # noqa: BLE001
        raise AtmError(f"cannot reach atm serve at {args.api} ({exc}); start it with "
                       f"`atm serve --model {args.model}`") from None
    if args.model not in served:
        raise AtmError(f"{args.api} does not serve {args.model!r}; it serves: {', '.join(served) or 'nothing'}")
    df = load_klines(args.klines)
    try:
        replay = Replay(df, ReplayConfig(send_bars=args.bars, chart_bars=args.chart_bars,
                                         horizon=args.horizon, fee=args.fee))
    except ValueError as exc:
        raise AtmError(f"{args.klines}: {exc}") from None
    demo = build_page(client, replay, start=args.start)
    print(f"atm chat: http://{args.host}:{args.port} (model {args.model} at {args.api})", flush=True)
    demo.launch(server_name=args.host, server_port=args.port, quiet=True, show_error=True)
    return 0
