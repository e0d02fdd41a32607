"""The release, in a module of its own: what writes builds stamps it without importing the
package's public API (fcsnap/__init__.py), which sits above the store."""

__version__ = "0.1.0"
