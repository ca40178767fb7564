"""Every template renders to a valid file; the renderer reports missing/unknown/ill-typed values."""
import subprocess
import sys

import pytest
import yaml

from rtpurbo_train.cluster import TemplateError, list_templates, render_template, template_params
from rtpurbo_train.cluster.templates import render_text

REQUIRED_VALUES = {"partition": "gpu", "recipe": "rtpurbo_300step", "output_dir": "runs/rtpurbo_300step",
                   "image": "registry.example.com/rtpurbo:1.0", "run_name": "first-run", "storage_class": "nfs"}
EXPECTED = {"slurm_sbatch", "slurm_srun", "k8s_pytorchjob", "k8s_indexed_job", "k8s_storage", "k8s_tensorboard"}


def required_values(name):
    return {k: REQUIRED_VALUES[k] for k, p in template_params(name).items() if p.required}


def test_all_templates_are_listed():
    assert EXPECTED <= set(list_templates())


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_renders_without_leftover_placeholders(name, tmp_path):
    text = render_template(name, required_values(name))
    assert "{{" not in text and "}}" not in text
    if name.startswith("slurm"):
        path = tmp_path / "job.sh"
        path.write_text(text)
        result = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
    else:
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
        assert docs and all({"apiVersion", "kind", "metadata"} <= set(d) for d in docs)


def test_every_value_reaches_the_output():
    # non-default values for every parameter, each distinct, must all appear in the rendered file
    for name in sorted(EXPECTED):
        values = {}
        for i, (key, p) in enumerate(template_params(name).items()):
            values[key] = str(900 + i) if p.type == "int" else f"v{i}x{key}"
        text = render_template(name, values)
        for key, value in values.items():
            assert value in text, (name, key)


def test_slurm_sbatch_settings_block():
    text = render_template("slurm_sbatch", {**required_values("slurm_sbatch"), "nodes": 4, "gpus_per_node": 4})
    for line in ("#SBATCH --nodes=4", "#SBATCH --gpus-per-node=4", "#SBATCH --partition=gpu",
                 "#SBATCH --requeue", "#SBATCH --signal=B:USR1@120", 'RECIPE="rtpurbo_300step"'):
        assert line in text.splitlines()


def test_pytorchjob_worker_count_is_nodes_minus_master():
    values = {**required_values("k8s_pytorchjob"), "nodes": 3, "gpus_per_node": 4}
    (job,) = yaml.safe_load_all(render_template("k8s_pytorchjob", values))
    specs = job["spec"]["pytorchReplicaSpecs"]
    assert specs["Master"]["replicas"] == 1 and specs["Worker"]["replicas"] == 2
    for role in ("Master", "Worker"):
        container = specs[role]["template"]["spec"]["containers"][0]
        env = {e["name"]: e["value"] for e in container["env"]}
        assert env["NNODES"] == "3" and env["GPUS_PER_NODE"] == "4"
        assert env["RTPURBO_OUTPUT_DIR"] == "/runs/first-run"
        assert container["resources"]["limits"]["nvidia.com/gpu"] == 4


def test_indexed_job_dns_matches_headless_service():
    values = {**required_values("k8s_indexed_job"), "job_name": "conv", "nodes": 4}
    service, job = yaml.safe_load_all(render_template("k8s_indexed_job", values))
    assert service["kind"] == "Service" and service["spec"]["clusterIP"] == "None"
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed" and spec["completions"] == spec["parallelism"] == 4
    pod = spec["template"]["spec"]
    assert pod["subdomain"] == service["metadata"]["name"] == "conv"
    assert service["spec"]["selector"] == {"job-name": "conv"}
    env = {e["name"]: e["value"] for e in pod["containers"][0]["env"]}
    assert env["MASTER_ADDR"] == "conv-0.conv"


def test_tensorboard_reads_the_training_volume():
    storage = yaml.safe_load(render_template("k8s_storage", required_values("k8s_storage")))
    deployment, service = yaml.safe_load_all(render_template("k8s_tensorboard", required_values("k8s_tensorboard")))
    (job,) = yaml.safe_load_all(render_template("k8s_pytorchjob", required_values("k8s_pytorchjob")))
    claim = storage["metadata"]["name"]
    volumes = deployment["spec"]["template"]["spec"]["volumes"]
    assert volumes[0]["persistentVolumeClaim"]["claimName"] == claim
    master_volumes = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["volumes"]
    assert {"claimName": claim} == master_volumes[0]["persistentVolumeClaim"]
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]


def test_error_names_missing_and_unknown_values():
    with pytest.raises(TemplateError) as err:
        render_template("slurm_sbatch", {"partition": "gpu", "nodez": 2})
    message = str(err.value)
    assert "recipe" in message and "output_dir" in message and "nodez" in message
    assert "partition" not in message.split("missing values:")[1].split("|")[0]


@pytest.mark.parametrize("key, value", [("nodes", "two"), ("nodes", "0"), ("recipe", "a b"),
                                        ("extra_args", '--set x="y"'), ("env_setup", "a\nb")])
def test_error_on_ill_typed_values(key, value):
    with pytest.raises(TemplateError, match=key):
        render_template("slurm_sbatch", {**required_values("slurm_sbatch"), key: value})


def test_render_text_rules():
    text = "# @param n | int | 3 | count\n# @param s | word | required | name\nx={{ n - 2 }} y={{n+2}} z={{s}}\n"
    assert render_text(text, {"s": "abc"}).splitlines()[-1] == "x=1 y=5 z=abc"
    with pytest.raises(TemplateError, match="too small"):
        render_text(text, {"s": "a", "n": 1})
    with pytest.raises(TemplateError, match="undeclared placeholders: other"):
        render_text("# @param a | int | 1 | a\n{{a}} {{other}}", {})
    with pytest.raises(TemplateError, match="only allowed on int"):
        render_text("# @param a | word | x | a\n{{a - 1}}", {})


def test_cli_render_and_error(tmp_path):
    args = [sys.executable, "-m", "rtpurbo_train.cluster", "render", "k8s_storage", "--set", "storage_class=nfs"]
    result = subprocess.run(args + ["--set", "storage_size=1Ti"], capture_output=True, text=True)
    assert result.returncode == 0 and yaml.safe_load(result.stdout)["spec"]["resources"]["requests"]["storage"] == "1Ti"
    result = subprocess.run(args[:-2] + ["--set", "bogus=1"], capture_output=True, text=True)
    assert result.returncode == 2 and "storage_class" in result.stderr and "bogus" in result.stderr
    out = tmp_path / "job.sh"
    values = [f"--set={k}={v}" for k, v in required_values("slurm_srun").items()]
    result = subprocess.run([sys.executable, "-m", "rtpurbo_train.cluster", "render", "slurm_srun", *values,
                             "-o", str(out)], capture_output=True, text=True)
    assert result.returncode == 0 and out.read_text().startswith("#!/bin/bash")
    again = subprocess.run([sys.executable, "-m", "rtpurbo_train.cluster", "render", "slurm_srun", *values,
                            "-o", str(out)], capture_output=True, text=True)
    assert again.returncode == 2 and "exists" in again.stderr
