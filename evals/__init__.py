"""Regression suites, graders, the forgetting-guard gate and its statistics (read-only use of `storage`)."""
