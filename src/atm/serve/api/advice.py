"""``POST /v1/advice``: klines in, the model's advice out (the work is ``atm.serve.advice``)."""

from __future__ import annotations

import time

from fastapi import APIRouter, Depends, Request
from starlette.responses import Response

from atm.serve.api.deps import ClientGone, ServeState, call_cancellable, read_request, serve_state
from atm.serve.api.errors import ApiError, dumps
from atm.serve.api.protocol import AdviceRequest, AdviceResponse

router = APIRouter()


@router.post("/v1/advice", response_model=AdviceResponse, summary="market advice for the minute after a window",
             description=AdviceResponse.__doc__,
             openapi_extra={"requestBody": {"required": True, "content": {"application/json": {
                 "schema": AdviceRequest.model_json_schema()}}}},
             responses={400: {"description": "bad input, naming the field (`error.param`) and the place"}})
async def advice(request: Request, st: ServeState = Depends(serve_state)):
    """The body is read by the strict reader (``read_request``); ``AdviceRequest`` documents it."""
    from atm.serve import advice as adv  # numpy, pandas and the encoders load on first use

    req, m = await read_request(request, st, AdviceRequest)
    t0 = time.perf_counter()
    try:
        result = await adv.advise(request, m, req, st.settings, call_cancellable)
    except ClientGone:
        st.metrics.disconnects.labels("/v1/advice").inc()
        return Response(status_code=499)
    except adv.AdviceInputError as exc:
        raise ApiError(400, str(exc), param=exc.param) from None
    st.metrics.usage(m.name, result.get("usage"))
    st.metrics.advice.labels(m.name, result["advice"] if result["valid"] else "invalid").inc()
    result["latency_ms"] = round((time.perf_counter() - t0) * 1000, 2)
    return Response(dumps(result), media_type="application/json")
