"""The serving gateway: OpenAI-compatible, in front of the vLLM endpoints, closing the loop.

Clients call `<track>` (or pin `<track>@v<N>`); the gateway routes each request to the version the
track's route points at (`routing`), balances over healthy endpoints (`endpoint_pool`), relays the
answer whole or streamed (`relay`), and logs every exchange and every piece of feedback into the
store off the request path (`exchange`, `capture`, `spool`), for tomorrow's harvest. `app` builds the
FastAPI app; `access` checks API keys; `server` runs the app under uvicorn in a thread (`overnight
serve`, `overnight gateway`, the demo).
"""

from pipeline.deploy.gateway.app import Gateway, create_app

__all__ = ["Gateway", "create_app"]
