"""What a build is on disk, wherever it is stored (docs/FORMAT.md §2 to §8)."""
