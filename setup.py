"""What pyproject.toml cannot say alone: the packages are every `tuner*` one plus `tuner.spaces`, the search spaces
shipped from their one source folder `search_spaces/` (`packages.find` cannot add a package mapped to another folder).
"""

from setuptools import find_namespace_packages, setup

setup(packages=[*find_namespace_packages(include=["tuner*"]), "tuner.spaces"],
      package_dir={"tuner.spaces": "search_spaces"})
