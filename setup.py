"""What pyproject.toml cannot say: the package list. The packages found under mllmfl_dist/, plus the
repository's top-level configs/ and shards/ folders (and each shard set inside shards/), which
pyproject.toml's package-dir maps to the package data mllmfl_dist/configs/ and mllmfl_dist/shards/ of a
wheel; setuptools' find cannot discover them, and a data folder left out of the list draws its warnings."""

from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).resolve().parent
SHIPPED = {"mllmfl_dist.configs": "configs", "mllmfl_dist.shards": "shards"}
data_packages = []
for package, folder in SHIPPED.items():
    data_packages.append(package)
    # Shard sets are one folder deep; *cache folders are local caches (.gitignore), not shipped.
    data_packages += [
        f"{package}.{d.name}"
        for d in sorted((HERE / folder).iterdir())
        if d.is_dir() and not d.name.endswith("cache") and not d.name.startswith((".", "_"))
    ]

setup(packages=[*find_packages(include=["mllmfl_dist", "mllmfl_dist.*"]), *data_packages])
