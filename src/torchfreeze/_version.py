"""The version of torchfreeze: this line is the only place it is written.

pyproject.toml reads it (``[tool.setuptools.dynamic]``), ``torchfreeze.__version__``
and ``torchfreeze --version`` show it, and CHANGELOG.md's newest release must match it
(tests/test_version.py).
"""

__version__ = "0.1.0"
