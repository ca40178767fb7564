"""Hostfiles from Slurm allocations."""
import subprocess
import sys
from pathlib import Path

import pytest

from rtpurbo_train.cluster import HostfileError, expand_nodelist, format_hostfile, hosts_from_scontrol, parse_hostfile

SCONTROL_OUTPUT = "gpu-a01\ngpu-a02\n\ngpu-b07\n"  # what `scontrol show hostnames` prints


def test_scontrol_output_to_hostfile():
    text = format_hostfile(hosts_from_scontrol(SCONTROL_OUTPUT), slots=8)
    assert text == "gpu-a01 slots=8\ngpu-a02 slots=8\ngpu-b07 slots=8\n"
    assert parse_hostfile(text) == [("gpu-a01", 8), ("gpu-a02", 8), ("gpu-b07", 8)]


@pytest.mark.parametrize("nodelist, hosts", [
    ("node7", ["node7"]),
    ("gpu[01-03,07],login5", ["gpu01", "gpu02", "gpu03", "gpu07", "login5"]),
    ("gpu[8-10]", ["gpu8", "gpu9", "gpu10"]),
    ("r[1-2]n[08-09]", ["r1n08", "r1n09", "r2n08", "r2n09"]),
    ("a[1,3]-ib", ["a1-ib", "a3-ib"]),
])
def test_expand_compressed_nodelist(nodelist, hosts):
    assert expand_nodelist(nodelist) == hosts


@pytest.mark.parametrize("bad", ["gpu[01-03", "gpu[3-1]", "gpu[a-b]", "a,,b", "gpu[1-2],gpu2", "bad host"])
def test_bad_nodelists(bad):
    with pytest.raises(HostfileError):
        expand_nodelist(bad)


def test_parse_hostfile_comments_and_errors():
    assert parse_hostfile("# cluster\nw1 slots=4  # first\n\nw2 slots = 2\n") == [("w1", 4), ("w2", 2)]
    for bad in ("w1 slots=0\n", "w1\n", "w1 slots=2\nw1 slots=2\n", ""):
        with pytest.raises(HostfileError):
            parse_hostfile(bad)
    with pytest.raises(HostfileError, match="slots"):
        format_hostfile(["w1"], slots=0)


def test_cli_reads_scontrol_output_from_stdin():
    result = subprocess.run([sys.executable, "-m", "rtpurbo_train.cluster", "hostfile", "--slots", "4"],
                            input=SCONTROL_OUTPUT, capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.splitlines()[2] == "gpu-b07 slots=4"
    result = subprocess.run([sys.executable, "-m", "rtpurbo_train.cluster", "hostfile", "--slots", "2",
                             "--nodelist", "n[1-2]"], capture_output=True, text=True)
    assert result.stdout == "n1 slots=2\nn2 slots=2\n"


def test_deepspeed_reads_our_hostfile():
    from deepspeed.launcher.runner import _parse_hostfile

    text = format_hostfile(expand_nodelist("gpu[01-02]"), slots=8)
    assert dict(_parse_hostfile(text.splitlines(keepends=True))) == {"gpu01": 8, "gpu02": 8}
    example = (Path(__file__).resolve().parents[2] / "launch" / "hostfile.example").read_text()
    assert dict(_parse_hostfile(example.splitlines(keepends=True))) == dict(parse_hostfile(example))
