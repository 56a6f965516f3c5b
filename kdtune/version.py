"""kdtune's version (one place: the package, MLflow tags, model requirements and ``kdtune --version`` read it)."""

__version__ = "0.1.0"
