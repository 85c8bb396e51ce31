"""The package version, in one place: ``lalora.__version__``, the precision file header and the fit metadata
read it from here (so no module of the package needs to import the package itself)."""
__version__ = "0.1.0"
