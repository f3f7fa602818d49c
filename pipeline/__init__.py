"""wbc-pipeline: train and evaluate white-blood-cell image classifiers across sites.

The package does nothing when imported; the ``wbc`` command line (:mod:`pipeline.cli`) runs it.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("wbc-pipeline")
except PackageNotFoundError:  # run from a source tree that was not installed
    __version__ = "0+unknown"
