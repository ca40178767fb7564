"""Synthetic long-context tasks (passkey, single needle, multi-key, multi-value, variable tracking) over a haystack
generated in code or made of the user's text. Nothing here comes from third-party prose."""
from .compose import ContextTooShort, SyntheticExample, TaskParts
from .config import SyntheticConfig, TaskName, TaskOptions
from .haystack import GeneratedHaystack, TextHaystack, haystack_text
from .mix import ANSWER_ROOM, mix_example
from .tasks import TASK_BUILDERS, make_example

TASKS = tuple(TASK_BUILDERS)

__all__ = [
    "ANSWER_ROOM",
    "ContextTooShort",
    "GeneratedHaystack",
    "SyntheticConfig",
    "SyntheticExample",
    "TASKS",
    "TaskName",
    "TaskOptions",
    "TaskParts",
    "TextHaystack",
    "haystack_text",
    "make_example",
    "mix_example",
]
