"""Deploy: hot-swap onto vLLM endpoints, release (deploy, rollback, status), the vLLM client and process,
and the OpenAI-compatible gateway in front of them (`gateway`)."""
