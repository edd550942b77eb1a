"""Names every stage shares, defined once.

Only plain values live here (no imports of other ATM modules), so any module may import it.
"""

from __future__ import annotations

# The three answers, in the order every probability vector, confusion matrix and returns table
# uses. Labels (atm.market.labels), answers (atm.prompting.advice), metrics (atm.eval.metrics) and
# the served /v1/advice all mean these strings.
ADVICES: tuple[str, ...] = ("BUY", "NOOP", "SELL")

MINUTE_NS = 60_000_000_000  # one minute in nanoseconds (pandas' datetime64[ns] unit)
