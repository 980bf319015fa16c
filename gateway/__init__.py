"""Privacy gateway between connected vehicles and the telematics backend."""

__version__ = "0.1.0"  # the release; pyproject.toml reads it from here
