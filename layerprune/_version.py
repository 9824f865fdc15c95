"""The installed version of layerprune, recorded in every output."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("layerprune")
except PackageNotFoundError:  # running from a source tree
    __version__ = "0.0.0"
