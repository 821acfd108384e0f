"""The one exception type users see for bad files, keys, shapes, values and arguments."""


class FuselmError(ValueError):
    """A user-facing error: the message names the file, tensor or key and what was expected."""


class NonFiniteLogits(FuselmError):
    """The model's logits hold NaN or +Inf: its weights overflow float32 (corrupt or out-of-range values)."""
