"""The one base class for every error the model store and its helpers raise.

Messages of these errors are shown to end users as they are: they say what is wrong and what
to do about it.
"""

from __future__ import annotations


class ModelStoreError(Exception):
    """Something about a model file, the model store or a model download went wrong."""
