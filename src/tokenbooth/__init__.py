"""tokenbooth: personalize auto-regressive text-to-image models with a learned token [V]."""

__version__ = "0.1.0"
