"""Builds the optional compiled modules (the fault path, pack's zero check); everything else
is in pyproject.toml.

Without a working C compiler their build is skipped with a warning and the install goes on:
the fault server and pack then use their pure-Python paths (same results, slower).
"""

from setuptools import setup
from setuptools.command.build_ext import build_ext
from setuptools.errors import CCompilerError, CompileError, ExecError, PlatformError


class OptionalBuildExt(build_ext):
    """build_ext that warns instead of failing when the C compiler is missing or fails."""

    def run(self) -> None:
        for ext in self.extensions:
            # Optional: a module that failed to build is not copied into the source tree,
            # which an in-place build (and so `pip install -e .`) would otherwise fail on.
            ext.optional = True
        try:
            super().run()
        except (PlatformError, CCompilerError, CompileError, ExecError, OSError) as e:
            self.warn(f"fcsnap: compiled modules not built ({e}); using pure Python")

    def build_extension(self, ext) -> None:  # type: ignore[no-untyped-def]
        try:
            super().build_extension(ext)
        except (CCompilerError, CompileError, ExecError, OSError) as e:
            self.warn(f"fcsnap: compiled modules not built ({e}); using pure Python")


setup(
    cffi_modules=["csrc/build_fastpath.py:ffibuilder", "csrc/build_blockscan.py:ffibuilder"],
    cmdclass={"build_ext": OptionalBuildExt},
)
