"""Export: a trained sparse model -> a Hugging Face folder (plain engines load the base model; with
`trust_remote_code=True` the shipped modeling code runs sparse prefill and decode)."""
from .writer import export_model

__all__ = ["export_model"]
