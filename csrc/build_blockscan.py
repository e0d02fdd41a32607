"""cffi API-mode build of pack's block scan (fcsnap.store.operations._blockscan).

Run by setuptools at install time through setup.py's `cffi_modules`, like the fault path's
module; the C source and its declarations live next to this file.
"""

from pathlib import Path

from cffi import FFI

HERE = Path(__file__).resolve().parent
DECLARATIONS = (HERE / "blockscan.h").read_text()

ffibuilder = FFI()
ffibuilder.cdef(DECLARATIONS)
ffibuilder.set_source(
    "fcsnap.store.operations._blockscan",
    "#include <stdint.h>\n" + DECLARATIONS + (HERE / "blockscan.c").read_text(),
    extra_compile_args=["-O3", "-Wall"],  # -O3: the zero check is vectorised
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
