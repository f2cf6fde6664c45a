"""Built-in recipes: a task (prompts, reward, tokenizer) plus the config defaults it was tuned with.

Each recipe module imports ``Recipe`` from ``launchers.recipes.recipe``, never from this package:
this package imports the recipe modules, so the other way round would be an import circle.
"""

from __future__ import annotations

from launchers.recipes.recipe import Recipe
from runtime.core.errors import ConfigError

__all__ = ["Recipe", "get_recipe"]


def _registry() -> dict[str, Recipe]:
    from launchers.recipes import calculator, chain_sum, coevolve, copy_digits, copy_long, long_tail

    recipes = (copy_digits.RECIPE, copy_digits.RECIPE_4, copy_long.RECIPE, long_tail.RECIPE, long_tail.RECIPE_WARMUP,
               coevolve.RECIPE, calculator.RECIPE, chain_sum.RECIPE)
    return {r.name: r for r in recipes}


def get_recipe(name: str) -> Recipe:
    recipes = _registry()
    if name not in recipes:
        raise ConfigError("--recipe", f"unknown recipe {name!r} (known: {', '.join(sorted(recipes))})")
    return recipes[name]
