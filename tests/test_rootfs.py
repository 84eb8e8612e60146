"""The data root's file layer: links are never followed unless allowed, only regular files
are read, and exclusive creation never writes through a planted link."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from neurotrale_twisted.core.errors import NotFound
from neurotrale_twisted.core.rootfs import Directory, OpenedFile, RootFS


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


def test_open_entry_opens_a_directory_or_a_regular_file_and_nothing_else(
    layout: tuple[Path, Path],
) -> None:
    root, outside = layout
    brain = root / "brain"
    os.mkfifo(brain / "pipe")
    (brain / "leak").symlink_to(outside / "secret")
    (brain / "away").symlink_to(outside)
    with RootFS(root).open_dir(["brain"]) as directory:
        with directory.open_entry("annotations") as sub:
            assert isinstance(sub, Directory) and sub.relative == "brain/annotations"
        with directory.open_entry("info") as opened:
            assert isinstance(opened, OpenedFile) and opened.read_all() == b"{}"
        for name in ("pipe", "leak", "away", "missing"):
            with pytest.raises(NotFound):
                directory.open_entry(name)
        with directory.open_entry("leak", follow=True) as opened:
            assert isinstance(opened, OpenedFile) and opened.read_all() == b"key"
        with pytest.raises(NotFound):
            directory.open_entry("pipe", follow=True)


def test_readable_entries_leave_out_dot_names_links_and_special_files(
    layout: tuple[Path, Path],
) -> None:
    root, outside = layout
    brain = root / "brain"
    os.mkfifo(brain / "pipe")
    (brain / ".versions").mkdir()
    (brain / ".lock").write_text("")
    (brain / "leak").symlink_to(outside / "secret")
    (brain / "away").symlink_to(outside)
    (brain / "dangling").symlink_to(outside / "nothing")
    with RootFS(root).open_dir(["brain"]) as directory:
        assert sorted(directory.readable_entries()) == [("annotations", True), ("info", False)]
        assert sorted(directory.readable_entries(follow=True)) == [
            ("annotations", True),
            ("away", True),
            ("info", False),
            ("leak", False),
        ]


def test_still_at_path_until_the_root_is_moved_or_removed(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    fs = RootFS(root)
    assert fs.still_at_path()
    root.rename(tmp_path / "moved")
    root.mkdir()  # another directory by the same name
    assert not fs.still_at_path()
    moved = RootFS(tmp_path / "moved")
    os.rmdir(tmp_path / "moved")
    assert not moved.still_at_path()


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


def test_reads_follow_a_link_that_stays_inside_the_root(layout: tuple[Path, Path]) -> None:
    root, _ = layout
    (root / "brain" / "notes.txt").write_text("inside")
    # A relative link, an absolute one, one through another link, and one with ``..``.
    (root / "alias").symlink_to("brain")
    (root / "absolute").symlink_to(root / "brain")
    (root / "brain" / "again").symlink_to("../alias/notes.txt")
    (root / "lab").mkdir()
    (root / "lab" / "brain").symlink_to("../alias")
    fs = RootFS(root)
    with fs.open_file(["alias", "notes.txt"]) as opened:
        assert opened.read_all() == b"inside"
    with fs.open_file(["absolute", "again"]) as opened:
        assert opened.read_all() == b"inside"
    with fs.open_dir(["lab", "brain"]) as brain:
        assert brain.read_file("info", follow=fs.read_follow)[0] == b"{}"
        assert sorted(brain.readable_entries(follow=fs.read_follow)) == [
            ("again", False),
            ("annotations", True),
            ("info", False),
            ("notes.txt", False),
        ]
    # Never for writes.
    with pytest.raises(NotFound):
        fs.open_dir(["alias"], for_write=True)


def test_links_that_leave_the_root_loop_or_dangle_are_not_found(
    layout: tuple[Path, Path],
) -> None:
    root, outside = layout
    (root / "up").symlink_to("../outside")
    (root / "brain" / "upup").symlink_to("../../outside/secret")
    (root / "abs").symlink_to(outside / "secret")
    (root / "loop").symlink_to("loop2")
    (root / "loop2").symlink_to("loop")
    (root / "dangling").symlink_to("nothing")
    (root / "self").symlink_to(".")
    fs = RootFS(root)
    for names in (["up", "secret"], ["brain", "upup"], ["abs"], ["loop"], ["dangling"]):
        with pytest.raises(NotFound):
            fs.open_file(names)
    with fs.open_dir(["self", "self", "brain"]) as brain:  # a link to the root is the root
        assert brain.relative == "brain"
    with fs.root() as top:
        assert sorted(top.readable_entries(follow=fs.read_follow)) == [
            ("brain", True),
            ("self", True),
        ]
