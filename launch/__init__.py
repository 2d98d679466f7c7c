"""`launch`: drive SageMaker with the image from a laptop, through the SageMaker Python SDK v2.

Runs on the host, never in the image: it imports neither torch nor the server; it shares only the
metric regexes and the hyperparameter schema with `train` (container.training).
"""
