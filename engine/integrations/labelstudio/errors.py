"""What the Label Studio edge raises."""
from __future__ import annotations




class LabelStudioError(RuntimeError):
    """A Label Studio problem the user can act on; the message is one line."""

class LabelStudioUnavailable(LabelStudioError):
    """The server did not answer (after retries)."""
