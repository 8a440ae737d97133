"""Installs the ``fastlm`` package; ``kernels/`` ships as ``fastlm.kernels`` (never a top-level
``kernels`` package: Hugging Face publishes one of that name)."""
import os

from setuptools import find_packages, setup

packages = find_packages(include=["fastlm", "fastlm.*"])
package_dir = {}
if os.path.isdir("kernels"):
    packages.append("fastlm.kernels")
    package_dir["fastlm.kernels"] = "kernels"

setup(packages=packages, package_dir=package_dir, include_package_data=True)
