"""User errors: one line on stderr, exit code 2, no traceback, nothing overwritten."""

from .helpers import TINY, python_cmd, run


def _fails(*args, fragment):
    proc = run(python_cmd(*args), check=False, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and fragment in lines[0], proc.stderr[-2000:]


def test_unknown_recipe():
    _fails("--recipe", "no_such_recipe", fragment="unknown recipe 'no_such_recipe'")


def test_typo_in_override():
    _fails("--recipe", str(TINY), "--set", "sparsity.widow=3", "--dry-run", fragment="did you mean 'window'")


def test_missing_model_path(tmp_path):
    out = tmp_path / "run"
    _fails("--recipe", str(TINY), "--set", f"model.name_or_path={tmp_path}/nope", "--output-dir", str(out),
           fragment="nope")


def test_existing_output_dir_of_another_run_is_not_overwritten(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    _fails("--recipe", str(TINY), "--output-dir", str(out), fragment="not empty")
    assert (out / "notes.txt").read_text() == "mine" and len(list(out.iterdir())) == 1


def test_missing_plan_for_a_recipe_without_calibration(tmp_path):
    _fails("--recipe", "indexer_warmup", "--set", "model.name_or_path=tiny-llama", "--output-dir",
           str(tmp_path / "r"), fragment="needs a sparsity plan")


def test_missing_data_path_stops_before_anything_is_written(tmp_path):
    out = tmp_path / "run"
    missing = tmp_path / "corpus" / "long.jsonl"
    _fails("--recipe", str(TINY), "--set", f"data.sources=[{{path: {missing}}}]", "--output-dir", str(out),
           fragment=f"data file not found: {missing}")
    assert not out.exists()
    _fails("--recipe", str(TINY), "--set", f"data.sources=[{{path: {tmp_path}/*.parquet}}]", "--dry-run",
           fragment="no files match")


def test_missing_public_corpus_says_how_to_build_it(tmp_path):
    _fails("--recipe", str(TINY), "--set", "data.sources=[{path: data/public/not_built.jsonl}]", "--dry-run",
           fragment="build it with `make data`")
