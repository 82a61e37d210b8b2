"""mnist-cloud's trainer: `python -m trainer`. Runs anywhere torch runs; imports no boto3 or fabric."""

__version__ = "0.1.0"
