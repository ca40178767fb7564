from .run import run_recipe

__all__ = ["run_recipe"]
