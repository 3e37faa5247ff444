"""Harnesses that start Hearth for tests and benchmarks, kept out of the production
packages: ``mesh`` (every service and the gateway as real processes on free ports) and
``inprocess`` (the services' real servers inside one process). Nothing in a service
imports these."""
