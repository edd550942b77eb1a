"""Market data: Binance klines in and out, labels, features and chronological splits."""
