"""Containment: the only way from a URL path to a file under the data root."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from neurotrale_twisted.core.errors import BadRequest, DomainError, NotFound
from neurotrale_twisted.core.paths import DataRoot, clean_segments


def test_clean_segments_folds_empty_ones() -> None:
    assert clean_segments(["", "brain1", "", "1_1_1", ""]) == ["brain1", "1_1_1"]
    assert clean_segments(["lab/2024", "brain1"]) == ["lab", "2024", "brain1"]


@pytest.mark.parametrize(
    ("segment", "error"),
    [
        ("..", BadRequest),
        (".", BadRequest),
        ("a\\b", BadRequest),
        ("a\x00b", BadRequest),
        ("x" * 256, BadRequest),
        (".hidden", NotFound),
        (".versions", NotFound),
        ("a/../b", BadRequest),
    ],
)
def test_refused_segments(segment: str, error: type[DomainError]) -> None:
    with pytest.raises(error):
        clean_segments(["ok", segment])


@given(st.lists(st.text(max_size=20), max_size=6))
def test_clean_segments_only_raises_domain_errors_and_never_escapes(segments: list[str]) -> None:
    try:
        cleaned = clean_segments(segments)
    except DomainError:
        return
    root = Path("/srv/data")
    assert all(s not in ("", ".", "..") and "/" not in s for s in cleaned)
    assert root.joinpath(*cleaned).resolve(strict=False).is_relative_to(root)


def test_symlinks_out_of_the_root(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "file").write_text("secret")
    root_dir = tmp_path / "root"
    root_dir.mkdir()
    (root_dir / "x").write_text("inside")
    (root_dir / "out").symlink_to(outside)
    (root_dir / "in").symlink_to(root_dir)
    strict = DataRoot(root_dir)
    with pytest.raises(NotFound):
        strict.fs.open_file(["out", "file"])
    with strict.fs.open_file(["in", "x"]) as opened:
        assert opened.read_all() == b"inside"
    lenient = DataRoot(root_dir, follow_symlinks=True)
    with lenient.fs.open_file(["out", "file"]) as opened:
        assert opened.read_all() == b"secret"
    for root in (strict, lenient):
        for link in ("out", "in"):
            with pytest.raises(NotFound):
                root.fs.open_dir([link], for_write=True)
    assert strict.name_of(["in", "x"]) == Path(root_dir).resolve() / "in" / "x"
