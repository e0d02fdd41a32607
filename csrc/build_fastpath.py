"""cffi API-mode build of the fault server's hot loop (fcsnap.uffd._fastpath).

Run by setuptools at install time through setup.py's `cffi_modules`; the C source and its
declarations live next to this file. Nothing is compiled at import time.
"""

from pathlib import Path

from cffi import FFI

HERE = Path(__file__).resolve().parent
DECLARATIONS = (HERE / "fastpath.h").read_text()

ffibuilder = FFI()
ffibuilder.cdef(DECLARATIONS)
ffibuilder.set_source(
    "fcsnap.uffd._fastpath",
    "#include <stdint.h>\n" + DECLARATIONS + (HERE / "fastpath.c").read_text(),
    extra_compile_args=["-O2", "-Wall"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
