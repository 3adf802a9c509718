"""The ceiling for ``bench_ingest.py``: the callback route doing nothing.

Same framework (FastAPI), same route, same answer as the real server, and
started through the same ``uvicorn.run`` call as ``smsbot serve``
(``log_level="info"``, ``access_log=False``, uvicorn's default loop and HTTP
implementation). It reads the body and answers ``{"result": 0, "errmsg": "OK"}``
without parsing, validating or storing anything, so the difference between
this and the real server is the cost of the pipeline.

Run: ``.venv/bin/python bench/bare_app.py --port 8001``
"""

from __future__ import annotations

import argparse

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

app = FastAPI(title="smsbot bench: bare callback")


@app.post("/sms/callback")
async def sms_callback(request: Request) -> JSONResponse:
    await request.body()
    return JSONResponse({"result": 0, "errmsg": "OK"})


@app.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


def main() -> None:
    import uvicorn

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    args = parser.parse_args()
    # Exactly what `smsbot serve` does (bot/cli/).
    uvicorn.run(app, host=args.host, port=args.port, log_level="info", access_log=False)


if __name__ == "__main__":
    main()
