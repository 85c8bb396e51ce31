"""Package discovery only; everything else is in pyproject.toml.

``backends/`` is installed as ``lalora.backends`` (``[tool.setuptools.package-dir]``), which
setuptools' declarative ``packages.find`` cannot express, so the package list is found here:
every package under ``lalora/`` and under ``backends/``, so a new subpackage is never left out
of the wheel (``scripts/wheel_check.sh`` checks the wheel against the checkout).
"""
from setuptools import find_packages, setup

packages = find_packages(include=["lalora", "lalora.*"])
packages += ["lalora.backends"] + [f"lalora.backends.{p}" for p in find_packages("backends")]
setup(packages=packages)
