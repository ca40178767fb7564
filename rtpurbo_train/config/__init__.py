from .loader import dump_recipe, load_recipe, recipe_path, validate_recipe
from .recipe import Recipe

__all__ = ["Recipe", "dump_recipe", "load_recipe", "recipe_path", "validate_recipe"]
