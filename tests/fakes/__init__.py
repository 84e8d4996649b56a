"""Fakes for the external systems a night uses (judge, registry, chat server, deployer, reply generator).

Real behaviour without the network: each fake implements the protocol its real counterpart does
(`pipeline.judge.client.Judge`, `pipeline.register.registry.Registry`, ...), so unit tests and the hermetic
night test exercise the pipeline's own logic; integration tests use the real systems.
"""
