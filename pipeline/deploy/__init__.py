"""Deploy: hot-swap onto vLLM endpoints, release (deploy, rollback, status), the vLLM client and process."""
