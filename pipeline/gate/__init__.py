"""Forgetting guard: reply generation, evaluation against the champion, the memory suite, the stage."""
