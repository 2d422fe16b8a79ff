"""What pyproject.toml cannot say: the package list. The packages found under mllmfl_dist/, plus the
repository's top-level configs/ and shards/ folders, which pyproject.toml's package-dir maps to the package
data mllmfl_dist/configs/ and mllmfl_dist/shards/ of a wheel (setuptools' find cannot discover them)."""

from setuptools import find_packages, setup

setup(packages=[*find_packages(include=["mllmfl_dist", "mllmfl_dist.*"]), "mllmfl_dist.configs",
                "mllmfl_dist.shards"])
