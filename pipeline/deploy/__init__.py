"""Deploy: load versions onto vLLM endpoints and flip the gateway's routes (`hotswap`), release (deploy,
rollback, status), `overnight serve` (`serving`), the vLLM client and process,
and the OpenAI-compatible gateway in front of them (`gateway`)."""
