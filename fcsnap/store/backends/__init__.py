"""Where builds live: a local directory, or object storage through a local mirror."""
