"""fcsnap: Firecracker memory snapshots in a generational store, restored lazily over uffd."""

__version__ = "0.1.0"
