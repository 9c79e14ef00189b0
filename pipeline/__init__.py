"""wysiwyc: train Explainers for frozen image classifiers and run them at scale."""

from importlib.metadata import PackageNotFoundError, version

try:  # the one home of the version is pyproject.toml; the installed package's metadata carries it
    __version__ = version("wysiwyc")
except PackageNotFoundError:  # a source tree on sys.path that was never installed
    __version__ = "0+unknown"
