"""Builds the native `torpor` launcher (bin/torpor.c) beside the Python one (bin/torpor-py).

Everything else is in pyproject.toml. Without a C compiler, `torpor` is a copy of `torpor-py`:
the same commands, ~10 ms slower each when an agent runs.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

# isort: off
# setuptools first: on Python >= 3.12 it is what provides distutils. It has no build_scripts
# command of its own; this is its bundled distutils'.
from setuptools import Distribution, setup
from distutils.command.build_scripts import build_scripts

# isort: on

HERE = os.path.dirname(os.path.abspath(__file__))


class BuildScripts(build_scripts):  # type: ignore[misc]
    """Copy the scripts, then compile ``bin/torpor.c`` into the same directory as ``torpor``."""

    def run(self) -> None:
        super().run()
        target = os.path.join(self.build_dir, "torpor")
        cc = os.environ.get("CC", "cc")
        cmd = [cc, "-O2", "-Wall", "-Wextra", "-o", target, os.path.join(HERE, "bin", "torpor.c")]
        try:
            subprocess.run(cmd, check=True)
        except (OSError, subprocess.CalledProcessError) as exc:
            print(
                f"torpor: cannot build the native launcher ({exc}); using torpor-py",
                file=sys.stderr,
            )
            shutil.copyfile(os.path.join(self.build_dir, "torpor-py"), target)
            shutil.copymode(os.path.join(self.build_dir, "torpor-py"), target)


class NativeDistribution(Distribution):
    """A wheel holding a compiled launcher is platform-specific (``cp311-…-linux_x86_64``, not
    ``py3-none-any``): pip must not reuse a cached wheel on another architecture."""

    def has_ext_modules(self) -> bool:
        return True


setup(cmdclass={"build_scripts": BuildScripts}, distclass=NativeDistribution)
