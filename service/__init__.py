"""tuneserve serving stage: `bentoml serve` (service.service:Tuneserve) on one artifact.

The version is kept here, not read from an installed distribution: the image and the bento
copy the sources and install no `tuneserve` package (tests/test_deploy.py checks it equals
pyproject.toml's).
"""

__version__ = "0.1.0"
