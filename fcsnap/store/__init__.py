"""The generational store, in three layers; each imports only its own and those below
(tests/test_layers.py):

format/      what a build is on disk: names, layout, locks, manifest, hash sidecars, pins,
             seekable zstd, lineages, and reading a generation's diffs
backends/    where builds live: a local directory, or object storage (S3) through a local
             mirror, its chunk cache, private files and leases; `stores` turns `--store`
             into one, `holds` keeps what a fault server serves from either
operations/  what commands do with them: build (pack, diff, squash), unpack, verify, ls,
             rm and gc (local and in object storage), push and pull, E2B import and export
"""
