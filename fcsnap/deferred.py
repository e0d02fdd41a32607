"""Import a heavy module later, off the critical path, without changing the code that uses it.

`fcsnap restore` must listen as soon as possible: the orchestrator waits for the socket before
it has Firecracker load the snapshot. Serving needs numpy, but only once a VM has connected,
and importing it costs about a third of the time to listen. So the command line puts a
stand-in for numpy in sys.modules before it imports the server (whose modules then bind `np`
to the stand-in), and loads the real module in a thread from then on, while the main thread
opens the store and listens: a VM that connects as soon as the socket listens then finds it
loaded at its first fault, which Firecracker's load call waits for. Whichever thread touches
the stand-in first loads it; the others wait for that load. After it, the stand-in holds the
real module's attributes, so using `np.x` costs what it costs on the real module.
"""

from __future__ import annotations

import importlib
import sys
import threading
import types
from typing import Any

from fcsnap.threads import start_signal_free


class Deferred(types.ModuleType):
    """Stands in for a module until its first attribute is asked for."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.__dict__["_deferred_lock"] = threading.Lock()

    def __getattr__(self, attr: str) -> Any:  # only for attributes not (yet) copied in
        return getattr(load(self), attr)


def load(stand_in: Deferred) -> types.ModuleType:
    """Import the real module (once) and copy its attributes onto the stand-in."""
    name = stand_in.__name__
    with stand_in.__dict__["_deferred_lock"]:
        real = sys.modules.get(name)
        if real is stand_in:
            del sys.modules[name]
            try:
                real = importlib.import_module(name)
            except BaseException:
                sys.modules[name] = stand_in
                raise
            stand_in.__dict__.update(real.__dict__)
        assert real is not None
        return real


def defer(name: str) -> Deferred | None:
    """Put a stand-in for `name` in sys.modules, unless the module is loaded already."""
    if name in sys.modules:
        return None
    stand_in = Deferred(name)
    sys.modules[name] = stand_in
    return stand_in


def load_in_background(stand_in: Deferred | None) -> threading.Thread | None:
    """Load the deferred module in a thread (not a daemon: an exit waits for the import to
    end rather than stopping it half way), leaving signals to the main thread."""
    if stand_in is None:
        return None
    return start_signal_free(
        threading.Thread(target=load, args=(stand_in,), name=f"import {stand_in.__name__}")
    )
