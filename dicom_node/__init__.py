"""dicom-node: a DICOM-native processing node."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("dicom-node")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"
