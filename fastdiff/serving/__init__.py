"""Serving: the continuous batcher (``batcher``), the ``fastdiff serve`` HTTP service (``http``, extra
``fastdiff[serve]``) and its Ray Serve deployment (``ray``, extra ``fastdiff[ray]``).

Only the batcher is imported here; the HTTP and Ray modules import their optional dependencies when used.
"""

from .batcher import BatcherClosed, ContinuousBatcher, QueueFull, QueueFullError

__all__ = ["BatcherClosed", "ContinuousBatcher", "QueueFull", "QueueFullError"]
