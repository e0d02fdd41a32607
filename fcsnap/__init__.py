"""fcsnap: Firecracker memory snapshots as a generational store, restored lazily over userfaultfd."""

__version__ = "0.1.0"
