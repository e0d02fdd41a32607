"""What the commands do with a store: build, read back, list, collect, transfer."""
