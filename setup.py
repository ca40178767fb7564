"""Packages: `rtpurbo_train` and the Triton kernels, whose folder `kernels/` imports as `rtpurbo_kernels`
(the bare name `kernels` belongs to the Hugging Face package that transformers probes for)."""
from setuptools import find_packages, setup

kernel_packages = ["rtpurbo_kernels"] + ["rtpurbo_kernels." + p for p in find_packages("kernels")]
setup(
    packages=find_packages(include=["rtpurbo_train", "rtpurbo_train.*"]) + kernel_packages,
    package_dir={"rtpurbo_kernels": "kernels"},
    package_data={"rtpurbo_train": ["export/remote_code/*.py"]},
)
