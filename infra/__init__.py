"""mnist-cloud's laptop side: the CLI, AWS provisioning and SSH. Imports no torch."""

__version__ = "0.1.0"
