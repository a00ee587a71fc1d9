"""The reference of the submission benchmark: a FastAPI app that takes the same ``JobRequest`` and only validates
it, no auth, I/O or middleware, served by the same uvicorn. Its rate under the same wrk load is what the real
API's is measured against, so the ratio survives the drift of a shared machine.

    uvicorn bench.trivial_app:app
"""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.responses import JSONResponse

from core.schemas import JobRequest

app = FastAPI(title="trivial reference")


@app.post("/v1/jobs", status_code=202)
async def create_job(req: JobRequest) -> JSONResponse:
    """Validate and answer with the normalized request, as the real API's job object carries it."""
    return JSONResponse({"id": "job_reference", "object": "job", "status": "queued", "request": req.normalized()},
                        status_code=202)  # fmt: skip


@app.get("/healthz")
async def healthz() -> dict[str, str]:
    """Up."""
    return {"status": "ok"}
