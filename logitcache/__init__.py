"""logitcache: capture a teacher's sparse next-token targets once, stream them to any student.

Importing this package is cheap: it never imports vllm or ray, and torch-heavy stages are
imported on first use.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
