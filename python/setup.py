"""Builds the etllm wheel: the pure-Python package plus libetllm.so and the ExecuTorch
runtime libraries it needs, bundled in etllm/_lib/ (loaded by absolute path, so no
environment variable is needed after installing).

The libraries come from an installed EtLlm prefix (tools/install.sh): the one named by
ETLLM_PREFIX when set (to reuse an existing install), else a fresh one that this build
makes by running tools/install.sh from the repository that holds this folder.
"""

import glob
import os
import shutil
import subprocess

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.dist import Distribution

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)


def installed_prefix(build_temp: str) -> str:
    prefix = os.environ.get("ETLLM_PREFIX")
    if prefix:
        prefix = os.path.abspath(prefix)
        if not os.path.isfile(os.path.join(prefix, "lib", "libetllm.so")):
            raise SystemExit(f"ETLLM_PREFIX={prefix} holds no lib/libetllm.so (tools/install.sh PREFIX)")
        return prefix
    script = os.path.join(REPO, "tools", "install.sh")
    if not os.path.isfile(script):
        raise SystemExit(
            "etllm: build from the EtLlm repository (pip install ./python), or set ETLLM_PREFIX "
            "to a prefix installed by tools/install.sh"
        )
    prefix = os.path.abspath(os.path.join(build_temp, "etllm-prefix"))
    subprocess.run(["bash", script, prefix], check=True)
    return prefix


class BuildWithLibrary(build_py):
    def run(self) -> None:
        super().run()
        build_temp = os.path.join(HERE, "build", "temp-etllm")
        os.makedirs(build_temp, exist_ok=True)
        prefix = installed_prefix(build_temp)
        dest = os.path.join(self.build_lib, "etllm", "_lib")
        os.makedirs(dest, exist_ok=True)
        libs = [os.path.join(prefix, "lib", "libetllm.so")]
        libs += sorted(glob.glob(os.path.join(prefix, "lib", "libexecutorch*.so")))
        for lib in libs:
            shutil.copy2(lib, os.path.join(dest, os.path.basename(lib)))


class BinaryDistribution(Distribution):
    """The wheel carries native libraries: tag it for this platform."""

    def has_ext_modules(self) -> bool:
        return True


setup(cmdclass={"build_py": BuildWithLibrary}, distclass=BinaryDistribution)
