"""Built-in curvature backends, installed as ``lalora.backends``.

Each module registers one backend family and is loaded through the ``lalora.backends``
entry-point group (see pyproject.toml), exactly like a third-party plugin; the heavy
libraries (curvlinops, BackPACK, laplace-torch) are imported only when their backend is used.
"""
