"""The data root's file layer: links are never followed unless allowed, only regular files
are read, and exclusive creation never writes through a planted link."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from neurotrale_twisted.errors import NotFound
from neurotrale_twisted.rootfs import RootFS


@pytest.fixture
def layout(tmp_path: Path) -> tuple[Path, Path]:
    root = tmp_path / "root"
    outside = tmp_path / "outside"
    (root / "brain" / "annotations").mkdir(parents=True)
    outside.mkdir()
    (outside / "secret").write_text("key")
    (root / "brain" / "info").write_text("{}")
    return root, outside


def test_walk_refuses_a_link_out_of_the_root(layout: tuple[Path, Path]) -> None:
    root, outside = layout
    (root / "linked").symlink_to(outside)
    fs = RootFS(root)
    with pytest.raises(NotFound):
        fs.open_dir(["linked"])
    with pytest.raises(NotFound):
        fs.open_file(["linked", "secret"])


def test_reads_follow_links_only_when_allowed(layout: tuple[Path, Path]) -> None:
    root, outside = layout
    (root / "linked").symlink_to(outside)
    fs = RootFS(root, follow_symlinks=True)
    with fs.open_file(["linked", "secret"]) as opened:
        assert opened.read_all() == b"key"
    with pytest.raises(NotFound):
        fs.open_dir(["linked"], for_write=True)


def test_a_file_link_is_not_read(layout: tuple[Path, Path]) -> None:
    root, outside = layout
    (root / "brain" / "leak").symlink_to(outside / "secret")
    with RootFS(root).open_dir(["brain"]) as brain, pytest.raises(NotFound):
        brain.read_file("leak")


def test_a_fifo_is_not_found_and_does_not_block(layout: tuple[Path, Path]) -> None:
    root, _ = layout
    os.mkfifo(root / "brain" / "pipe")
    with RootFS(root).open_dir(["brain"]) as brain, pytest.raises(NotFound):
        brain.read_file("pipe")


def test_exclusive_creation_never_writes_through_a_planted_link(
    layout: tuple[Path, Path],
) -> None:
    root, outside = layout
    (root / "brain" / ".x.lock").symlink_to(outside / "created")
    (root / "brain" / "taken").symlink_to(outside / "created2")
    with RootFS(root).open_dir(["brain"], for_write=True) as brain:
        with pytest.raises(FileExistsError):
            brain.create_exclusive("taken", b"data")
        with pytest.raises(NotFound):
            brain.open_lock(".x.lock")
    assert sorted(p.name for p in outside.iterdir()) == ["secret"]


def test_a_directory_swapped_for_a_link_after_opening_is_not_followed(
    layout: tuple[Path, Path],
) -> None:
    root, outside = layout
    fs = RootFS(root)
    with fs.open_dir(["brain", "annotations"], for_write=True) as annotations:
        # Someone swaps the directory away and plants a link where it was.
        os.rename(root / "brain" / "annotations", root / "brain" / "moved")
        (root / "brain" / "annotations").symlink_to(outside)
        name = annotations.write_temporary(b"[]", "fibers.json")
        annotations.rename(name, "fibers.json")
    # The write landed in the directory that was opened, now called "moved".
    assert (root / "brain" / "moved" / "fibers.json").read_bytes() == b"[]"
    assert sorted(p.name for p in outside.iterdir()) == ["secret"]
    with pytest.raises(NotFound):
        fs.open_dir(["brain", "annotations"], for_write=True)


def test_link_is_exclusive(layout: tuple[Path, Path]) -> None:
    root, _ = layout
    with RootFS(root).open_dir(["brain"], for_write=True) as brain:
        first = brain.write_temporary(b"1")
        second = brain.write_temporary(b"2")
        brain.link(first, "1.json")
        with pytest.raises(FileExistsError):
            brain.link(second, "1.json")
        assert brain.read_file("1.json")[0] == b"1"
        with brain.make_subdir("sub") as sub:
            brain.rename(second, "2.json", sub)
            assert sub.read_file("2.json")[0] == b"2"
