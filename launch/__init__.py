"""`launch`: drive SageMaker with the image from a laptop, through the SageMaker Python SDK v2.

Runs on the host, never in the image, and installs without torch (`pip install '.[launch]'`): it
imports no module that needs torch or the server. What it shares with the image comes from
the image's torch-free modules, so both sides read one definition: the metric regexes and the
hyperparameter schema (container.training.metrics, .hyperparameters), the /opt/ml names, channels
and report files (container.sagemaker_env), what /invocations speaks (container.invocations),
class names (container.class_names), the GPU driver table (container.gpu_drivers) and the HTML
page builder (container.html_page). `launch report` analyses smdebug tensors only where smdebug
and torch are installed, importing them when it does.
"""
