"""The data stamp (segflow.core.data_stamp): contents, not times; its cache; the demo list."""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path

import pytest

from segflow.core import data_stamp as stamp_module
from segflow.core.data_stamp import (
    CONTENT_LIST,
    DEMO_STAMP,
    data_stamp,
    demo_stamp,
    write_content_list,
)
from segflow.data.demo_data import DemoDataOptions, generate_demo_data


def make_folder(root: Path) -> Path:
    folder = root / "images"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.png").write_bytes(b"one")
    (folder / "sub" / "b.png").write_bytes(b"two")
    return folder


def shift_times(path: Path, seconds: int = 1000) -> None:
    """``touch`` to another time: same bytes, new modification time."""
    info = path.stat()
    os.utime(path, ns=(info.st_atime_ns, info.st_mtime_ns + seconds * 10**9))


@pytest.fixture
def count_reads(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Every file whose bytes the stamp reads, in order."""
    reads: list[Path] = []
    real = stamp_module.hash_file

    def counting(path: Path) -> str:
        reads.append(Path(path))
        return real(path)

    monkeypatch.setattr(stamp_module, "hash_file", counting)
    return reads


@pytest.mark.parametrize("cached", [False, True])
def test_touch_keeps_the_stamp_and_new_bytes_change_it(tmp_path: Path, cached: bool) -> None:
    folder = make_folder(tmp_path)
    table = tmp_path / "train.csv"
    table.write_text("id,rle_mask\n")
    cache = tmp_path / ".snakemake" / "segflow" / "data_stamp.json" if cached else None
    before = data_stamp(folder, table, tmp_path / "absent", cache=cache)
    shift_times(folder / "a.png")
    shift_times(table)
    assert data_stamp(folder, table, tmp_path / "absent", cache=cache) == before
    folder_mtime = folder.stat().st_mtime_ns
    (folder / "a.png").write_bytes(b"ONE")  # same size, in place: the folder's time stays
    assert folder.stat().st_mtime_ns == folder_mtime
    changed = data_stamp(folder, table, tmp_path / "absent", cache=cache)
    assert changed != before
    (folder / "a.png").write_bytes(b"one")  # the old bytes back: the old stamp
    assert data_stamp(folder, table, tmp_path / "absent", cache=cache) == before
    table.write_text("id,rle_mask\nx,1 2\n")
    assert data_stamp(folder, table, tmp_path / "absent", cache=cache) != before
    assert data_stamp(tmp_path / "absent") != data_stamp(tmp_path / "other-absent")


def test_names_and_presence_count_hidden_files_do_not(tmp_path: Path) -> None:
    folder = make_folder(tmp_path)
    before = data_stamp(folder)
    (folder / ".snakemake_timestamp").write_bytes(b"")
    (folder / "._a.png").write_bytes(b"macOS")
    (folder / ".hidden").mkdir()
    (folder / ".hidden" / "c.png").write_bytes(b"three")
    assert data_stamp(folder) == before
    (folder / "a.png").rename(folder / "c.png")
    renamed = data_stamp(folder)
    assert renamed != before
    (folder / "d.png").write_bytes(b"four")
    assert data_stamp(folder) not in (before, renamed)


def test_a_rewrite_that_puts_the_old_time_back_still_changes_the_stamp(
    tmp_path: Path, count_reads: list[Path]
) -> None:
    """`cp -p`/`rsync -t`: same name, size and modification time, other bytes. The cache key
    holds the ctime, which no program can set back."""
    folder = make_folder(tmp_path)
    cache = tmp_path / "cache.json"
    image = folder / "a.png"
    before = data_stamp(folder, cache=cache)
    info = image.stat()
    image.write_bytes(b"ONE")
    os.utime(image, ns=(info.st_atime_ns, info.st_mtime_ns))
    assert image.stat().st_mtime_ns == info.st_mtime_ns
    assert image.stat().st_size == info.st_size
    count_reads.clear()
    assert data_stamp(folder, cache=cache) != before
    assert count_reads == [image]


def test_the_cache_spares_reading_unchanged_files(tmp_path: Path, count_reads: list[Path]) -> None:
    folder = make_folder(tmp_path)
    cache = tmp_path / ".snakemake" / "segflow" / "data_stamp.json"
    first = data_stamp(folder, cache=cache)
    assert sorted(count_reads) == sorted([folder / "a.png", folder / "sub" / "b.png"])
    entries = json.loads(cache.read_text())["files"]
    assert sorted(entries) == sorted(
        os.path.abspath(p) for p in (folder / "a.png", folder / "sub" / "b.png")
    )
    assert [p.name for p in cache.parent.iterdir()] == [cache.name]  # no temporary left
    count_reads.clear()
    cache_mtime = cache.stat().st_mtime_ns
    assert data_stamp(folder, cache=cache) == first
    assert count_reads == []  # stat only
    assert cache.stat().st_mtime_ns == cache_mtime  # nothing new: the cache is not rewritten
    shift_times(folder / "a.png")
    assert data_stamp(folder, cache=cache) == first
    assert count_reads == [folder / "a.png"]  # the touched file only
    count_reads.clear()
    (folder / "sub" / "b.png").unlink()
    data_stamp(folder, cache=cache)
    assert count_reads == []
    assert sorted(json.loads(cache.read_text())["files"]) == [os.path.abspath(folder / "a.png")]


def test_the_cache_keeps_other_folders_and_survives_damage(
    tmp_path: Path, count_reads: list[Path]
) -> None:
    one, two = make_folder(tmp_path / "one"), make_folder(tmp_path / "two")
    cache = tmp_path / "cache.json"
    data_stamp(one, cache=cache)
    stamp_two = data_stamp(two, cache=cache)
    count_reads.clear()
    data_stamp(one, cache=cache)  # another configuration's data: still cached
    assert count_reads == []
    cache.write_text("{not json")
    assert data_stamp(two, cache=cache) == stamp_two
    assert len(count_reads) == 2
    assert data_stamp(two, cache=tmp_path / "no-such-dir" / "x" / "cache.json") == stamp_two


def test_dangling_links_and_fifos_do_not_break_the_stamp(tmp_path: Path) -> None:
    folder = make_folder(tmp_path)
    before = data_stamp(folder, cache=tmp_path / "cache.json")
    (folder / "gone.png").symlink_to(tmp_path / "nowhere.png")
    os.mkfifo(folder / "pipe.png")  # opening it would block the parse
    (folder / "loop").symlink_to(folder)  # a link loop: followed once
    dangling = data_stamp(folder, cache=tmp_path / "cache.json")
    assert dangling != before
    (tmp_path / "nowhere.png").write_bytes(b"here")
    assert data_stamp(folder, cache=tmp_path / "cache.json") != dangling
    assert data_stamp(folder / "gone.png") != data_stamp(folder / "other.png")


def test_demo_stamp_is_demo_until_a_generated_file_changes(
    tmp_path: Path, count_reads: list[Path]
) -> None:
    options = DemoDataOptions(n_train=20, n_test=8, seed=3)
    generator = asdict(options)
    folder = tmp_path / "demo"
    cache = tmp_path / "cache.json"
    assert demo_stamp(folder, generator, cache) == DEMO_STAMP  # not generated yet
    generate_demo_data(folder, options)
    listing = json.loads((folder / CONTENT_LIST).read_text())
    assert listing["generator"] == generator
    assert "train.csv" in listing["files"] and CONTENT_LIST not in listing["files"]
    assert len([f for f in listing["files"] if f.startswith("train/images/")]) == 20
    (folder / ".snakemake_timestamp").write_bytes(b"")  # what Snakemake adds to the output
    assert demo_stamp(folder, generator, cache) == DEMO_STAMP
    count_reads.clear()
    image = sorted((folder / "train" / "images").glob("*.png"))[0]
    shift_times(image)
    assert demo_stamp(folder, generator, cache) == DEMO_STAMP
    assert count_reads == [image]

    original = image.read_bytes()
    image.write_bytes(original[::-1])
    edited = demo_stamp(folder, generator, cache)
    assert edited.startswith("demo-") and edited == demo_stamp(folder, generator, cache)
    # Other options: the folder is regenerated in this run, so its edits do not count.
    assert demo_stamp(folder, {**generator, "seed": 4}, cache) == DEMO_STAMP
    image.write_bytes(original)
    assert demo_stamp(folder, generator, cache) == DEMO_STAMP
    (folder / "test" / "images" / "extra.png").write_bytes(original)
    added = demo_stamp(folder, generator, cache)
    assert added not in (DEMO_STAMP, edited)
    (folder / "test" / "images" / "extra.png").unlink()
    image.unlink()
    assert demo_stamp(folder, generator, cache) not in (DEMO_STAMP, edited, added)


def test_demo_stamp_without_or_with_a_damaged_list(tmp_path: Path) -> None:
    folder = make_folder(tmp_path)
    generator = {"seed": 0}
    assert demo_stamp(folder, generator) == DEMO_STAMP  # generated before the lists existed
    write_content_list(folder, generator)
    assert demo_stamp(folder, generator) == DEMO_STAMP
    (folder / CONTENT_LIST).write_text("[]")
    damaged = demo_stamp(folder, generator)
    assert damaged != DEMO_STAMP and damaged.startswith("demo-")
