"""FuckBase: a small, fast HTTP database with S3-compatible backups."""

__version__ = "0.1.0"
