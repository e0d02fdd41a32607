"""bench/corpus.py's `cached_corpus`: how benches (bench/s3.py --corpus) find the real-guest
corpus a previous run cached, without booting a guest or installing anything."""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
import corpus as corpus_mod  # noqa: E402

SIZE = 16 << 20


def fake_corpus(cache: Path, key: str, created_at: str, sizes: list[int],
                fmt: int = corpus_mod.FORMAT) -> Path:
    """A corpus directory as build_corpus leaves it: images and manifest.json."""
    path = cache / f"{SIZE >> 20}M-{len(sizes)}-{key}"
    path.mkdir(parents=True)
    generations = []
    for n, size in enumerate(sizes):
        with open(path / f"gen{n}.mem", "wb") as f:
            f.truncate(size)
        generations.append({"file": f"gen{n}.mem"})
    (path / "manifest.json").write_text(json.dumps(
        {"format": fmt, "created_at": created_at, "generations": generations}))
    return path


def test_the_newest_complete_corpus_is_found(tmp_path: Path) -> None:
    assert corpus_mod.cached_corpus(SIZE, 2, tmp_path) is None  # nothing cached
    old = fake_corpus(tmp_path, "aaa", "2026-01-01T00:00:00+00:00", [SIZE, SIZE])
    fake_corpus(tmp_path, "bbb", "2026-06-01T00:00:00+00:00", [SIZE, SIZE // 2])  # cut short
    fake_corpus(tmp_path, "ccc", "2026-07-01T00:00:00+00:00", [SIZE, SIZE], fmt=-1)  # old format
    (tmp_path / ".16M-2-ddd.partial").mkdir()  # a build under way
    found = corpus_mod.cached_corpus(SIZE, 2, tmp_path)
    assert found is not None and found.path == old
    assert found.images == [old / "gen0.mem", old / "gen1.mem"]
    new = fake_corpus(tmp_path, "eee", "2026-08-01T00:00:00+00:00", [SIZE, SIZE])
    assert corpus_mod.cached_corpus(SIZE, 2, tmp_path).path == new
    assert corpus_mod.cached_corpus(SIZE, 3, tmp_path) is None  # other stage counts differ
