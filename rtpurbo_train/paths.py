"""The repository checkout the package runs from (an editable install): relative recipe, DeepSpeed config and
data paths are looked up here when they are not found in the working directory."""
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
