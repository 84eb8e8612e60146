"""``neurotrale-ingest``: TIFF planes in, a dataset the real server serves out.

The datasets are read back over HTTP from a real ``twistd neurotrale`` with cloud-volume and
compared with the source and with a plain numpy downsample written here, independently of
the module's own.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import tifffile

from neurotrale_twisted.tools.ingest.chunkfiles import StripResult
from neurotrale_twisted.tools.ingest.cli import build_parser, main
from neurotrale_twisted.tools.ingest.downsample import downsample_mean, downsample_mode
from neurotrale_twisted.tools.ingest.layout import default_levels
from neurotrale_twisted.tools.ingest.run import ingest
from neurotrale_twisted.tools.ingest.settings import SETTINGS_FILE, prepare
from tests.test_e2e import Twistd

IMAGE_SIZE = (150, 97, 70)  # x, y, z: no dimension a multiple of the chunk size
IMAGE_CHUNK = "32,32,16"
LABELS_SIZE = (61, 45, 27)
LABELS_CHUNK = "16,16,8"


# -- An independent reference ---------------------------------------------------------------


def _blocks(volume: np.ndarray) -> np.ndarray:
    """(z/2, y/2, x/2, 8) blocks of a (z, y, x) volume whose odd edges repeat their last voxel."""
    padded = np.pad(volume, [(0, s % 2) for s in volume.shape], mode="edge")
    z, y, x = padded.shape
    blocks = padded.reshape(z // 2, 2, y // 2, 2, x // 2, 2).transpose(0, 2, 4, 1, 3, 5)
    return blocks.reshape(z // 2, y // 2, x // 2, 8)


def reference_mean(volume: np.ndarray) -> np.ndarray:
    """The block mean, rounded half up (exact in float64 for 16-bit voxels)."""
    mean = _blocks(volume).astype(np.float64).mean(axis=-1)
    rounded: np.ndarray = np.floor(mean + 0.5).astype(volume.dtype)
    return rounded


def reference_mode(volume: np.ndarray) -> np.ndarray:
    """The most frequent label of each block, the smallest on a tie, one block at a time."""
    blocks = _blocks(volume)
    out = np.empty(blocks.shape[:3], volume.dtype)
    for index in np.ndindex(*out.shape):
        labels, counts = np.unique(blocks[index], return_counts=True)
        out[index] = labels[np.argmax(counts)]
    return out


def pyramid(volume: np.ndarray, levels: int, halve) -> list[np.ndarray]:
    scales = [volume]
    for _ in range(levels - 1):
        scales.append(halve(scales[-1]))
    return scales


# -- Sources and the served root --------------------------------------------------------------


def write_planes(directory: Path, volume: np.ndarray, **imwrite: object) -> Path:
    """One 2-D TIFF per z, named ``plane{z}.tif`` without zero padding (natural order matters)."""
    directory.mkdir(parents=True)
    for z, plane in enumerate(volume):
        tifffile.imwrite(directory / f"plane{z}.tif", plane, **imwrite)
    return directory


def image_volume(size: tuple[int, int, int]) -> np.ndarray:
    """(z, y, x) uint16 over the whole range, so a wrong rounding or an overflow shows."""
    x, y, z = size
    return np.random.default_rng(3).integers(0, 65536, (z, y, x), dtype=np.uint16)


def label_volume(size: tuple[int, int, int]) -> np.ndarray:
    """(z, y, x) uint32 labels from a small set, so that ties are common."""
    x, y, z = size
    labels = np.array([0, 7, 3_000_000_000, 12, 4_294_967_295], np.uint32)
    return labels[np.random.default_rng(5).integers(0, len(labels), (z, y, x))]


def run(command: str) -> int:
    """``neurotrale-ingest COMMAND`` in this process (split like a shell would); its exit status."""
    return main(shlex.split(command))


def tree(directory: Path) -> dict[str, bytes]:
    """Every file under ``directory`` (dot-files included) by relative path, with its bytes."""
    return {
        str(p.relative_to(directory)): p.read_bytes()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


@dataclass
class Served:
    root: Path
    image: np.ndarray
    labels: np.ndarray
    server: Twistd


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """Three ingested datasets under one root, served by a real ``twistd neurotrale``."""
    work = tmp_path_factory.mktemp("ingest")
    root = work / "data"
    image = image_volume(IMAGE_SIZE)
    labels = label_volume(LABELS_SIZE)
    planes = write_planes(work / "planes", image)
    # Writer processes, zlib chunks, and a pyramid deeper than the default.
    options = f"--chunk-size {IMAGE_CHUNK} --levels 3 --compression zlib"
    assert run(f"--source '{planes}/*.tif' --dest {root}/brain {options} --jobs 2") == 0
    label_planes = write_planes(work / "labels", labels, compression="zlib")
    labels_options = f"--segmentation --chunk-size {LABELS_CHUNK} --levels 3"
    assert run(f"--source {label_planes} --dest {root}/labels {labels_options} --jobs 1") == 0
    stack = work / "stack.tif"
    tifffile.imwrite(stack, image, photometric="minisblack")
    assert run(f"--source {stack} --dest {root}/stack {options} --jobs 1") == 0
    server = Twistd(root, work / "server.log")
    yield Served(root, image, labels, server)
    server.stop()


# -- What a user sees -------------------------------------------------------------------------


def test_info_and_chunk_files_follow_precomputed_tif(served: Served) -> None:
    info = json.loads((served.root / "brain" / "info").read_text())
    assert {k: v for k, v in info.items() if k != "scales"} == {
        "data_type": "uint16",
        "mesh": "mesh",
        "num_channels": 1,
        "type": "image",
    }
    assert info["scales"] == [
        {
            "chunk_sizes": [[32, 32, 16]],
            "encoding": "raw",
            "key": key,
            "resolution": resolution,
            "size": size,
            "voxel_offset": [0, 0, 0],
        }
        for key, resolution, size in [
            ("1_1_1", [1800, 1800, 2000], [150, 97, 70]),
            ("2_2_2", [3600, 3600, 4000], [75, 49, 35]),
            ("4_4_4", [7200, 7200, 8000], [38, 25, 18]),
        ]
    ]
    # Every chunk of the grid, edge chunks truncated, each a (z, y, x) TIFF of that shape.
    for scale in info["scales"]:
        x, y, z = scale["size"]
        expected = {
            f"{x0}-{min(x0 + 32, x)}_{y0}-{min(y0 + 32, y)}_{z0}-{min(z0 + 16, z)}.tiff"
            for x0 in range(0, x, 32)
            for y0 in range(0, y, 32)
            for z0 in range(0, z, 16)
        }
        directory = served.root / "brain" / scale["key"]
        assert {p.name for p in directory.iterdir()} == expected
    edge = tifffile.imread(served.root / "brain" / "1_1_1" / "128-150_96-97_64-70.tiff")
    assert edge.shape == (6, 1, 22)
    assert np.array_equal(edge, served.image[64:70, 96:97, 128:150])
    labels = json.loads((served.root / "labels" / "info").read_text())
    assert (labels["type"], labels["data_type"]) == ("segmentation", "uint32")


def assert_served_scales(url: str, expected: list[np.ndarray]) -> None:
    """cloud-volume reads every scale of the dataset at ``url`` equal to ``expected`` (z, y, x)."""
    from cloudvolume import CloudVolume

    for mip, scale in enumerate(expected):
        volume = CloudVolume(
            f"precomputed://{url}", mip=mip, progress=False, cache=False, fill_missing=False
        )
        z, y, x = scale.shape
        cutout = np.asarray(volume[0:x, 0:y, 0:z])[..., 0]
        assert cutout.dtype == scale.dtype, f"mip {mip}"
        # cloud-volume answers (x, y, z); the source planes are (z, y, x).
        assert np.array_equal(cutout.transpose(2, 1, 0), scale), f"mip {mip}"


def test_cloud_volume_reads_every_scale_as_a_numpy_downsample(served: Served) -> None:
    assert_served_scales(f"{served.server.url}/brain", pyramid(served.image, 3, reference_mean))


def test_segmentation_scales_hold_the_most_frequent_label(served: Served) -> None:
    labels = pyramid(served.labels, 3, reference_mode)
    assert labels[0].dtype == np.uint32
    assert_served_scales(f"{served.server.url}/labels", labels)


def test_one_3d_tiff_makes_the_same_dataset_as_its_planes(served: Served) -> None:
    stack, planes = tree(served.root / "stack"), tree(served.root / "brain")
    assert stack.keys() == planes.keys()
    assert all(stack[name] == planes[name] for name in stack if name != SETTINGS_FILE)


def test_rounding_and_ties() -> None:
    # Means round half up; an odd edge averages only the voxels it has.
    volume = np.array([[[1, 2, 9]], [[2, 2, 9]]], np.uint8)  # (z, y, x) = (2, 1, 3)
    assert downsample_mean(volume).tolist() == [[[2, 9]]]  # 7/4 -> 2, 9
    assert downsample_mean(np.array([[[255, 254]]], np.uint8)).tolist() == [[[255]]]
    assert downsample_mean(np.array([[[-3, -4]]], np.int16)).tolist() == [[[-3]]]  # -3.5 -> -3
    labels = np.array([[[5, 9], [9, 5]], [[1, 1], [2, 2]]], np.uint64)  # 5, 9, 1, 2 twice each
    assert downsample_mode(labels).tolist() == [[[1]]]
    assert downsample_mode(np.array([[[4, 6, 6]]], np.uint16)).tolist() == [[[4, 6]]]


def test_default_levels_stop_before_a_dimension_drops_below_a_chunk() -> None:
    assert default_levels((1024, 1024, 256), (64, 64, 64)) == 3
    assert default_levels((150, 97, 70), (32, 32, 16)) == 2
    assert default_levels((10, 10, 10), (64, 64, 64)) == 1


def read_scale(directory: Path, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """A scale's (z, y, x) volume put together from its chunk files, NaN-free zeros elsewhere."""
    volume = np.zeros(shape, dtype)
    for path in directory.glob("*.tiff"):
        (x0, x1), (y0, y1), (z0, z1) = (map(int, part.split("-")) for part in path.stem.split("_"))
        chunk = tifffile.imread(path)
        assert chunk.shape == (z1 - z0, y1 - y0, x1 - x0), path.name
        volume[z0:z1, y0:y1, x0:x1] = chunk
    return volume


@pytest.mark.parametrize("segmentation", [False, True])
@pytest.mark.parametrize("chunk", ["7,5,3", "16,16,5"])
def test_odd_chunk_sizes_stream_the_same_pyramid(
    tmp_path: Path, chunk: str, segmentation: bool
) -> None:
    # Odd chunk depths make planes wait across chunk rows for their pair.
    volume = label_volume((23, 19, 21)) if segmentation else image_volume((23, 19, 21))
    planes = write_planes(tmp_path / "planes", volume)
    kind = "--segmentation" if segmentation else ""
    options = f"--chunk-size {chunk} --levels 4 --jobs 1 {kind}"
    assert run(f"--source {planes} --dest {tmp_path}/out {options}") == 0
    halve = reference_mode if segmentation else reference_mean
    for level, expected in enumerate(pyramid(volume, 4, halve)):
        directory = tmp_path / "out" / f"{2**level}_{2**level}_{2**level}"
        assert np.array_equal(read_scale(directory, expected.shape, volume.dtype), expected)


# -- Resuming ---------------------------------------------------------------------------------


class Interrupted(Exception):
    """Stands for a kill part way through."""


def test_resume_after_an_interruption_gives_the_same_files(tmp_path: Path) -> None:
    volume = image_volume((90, 70, 45))
    planes = write_planes(tmp_path / "planes", volume)
    options = ["--source", str(planes), "--chunk-size", "32,32,16", "--levels", "3", "--jobs", "1"]
    assert main([*options, "--dest", str(tmp_path / "whole")]) == 0

    dataset = tmp_path / "resumed"
    settings = prepare(build_parser().parse_args([*options, "--dest", str(dataset)]))
    strips: list[StripResult] = []

    def stop_part_way(result: StripResult) -> None:
        strips.append(result)
        if len(strips) == 4:
            raise Interrupted

    with pytest.raises(Interrupted):
        ingest(settings, on_strip=stop_part_way)
    level0 = dataset / "1_1_1"
    written = sorted(level0.iterdir())
    assert 0 < len(written) < 3 * 3 * 3
    assert not (dataset / "2_2_2").exists() or len(list((dataset / "2_2_2").iterdir())) < 8
    # What a kill leaves behind: a torn chunk, a lost one, a temporary file.
    torn, lost, kept = written[0], written[1], written[2]
    torn.write_bytes(torn.read_bytes()[: torn.stat().st_size // 2])
    lost.unlink()
    (level0 / f".{lost.name}.999.tmp").write_bytes(b"partial")
    kept_inode = kept.stat().st_ino

    assert main([*options, "--dest", str(dataset)]) == 2  # not without --resume
    assert main([*options, "--dest", str(dataset), "--resume"]) == 0
    assert tree(dataset) == tree(tmp_path / "whole")
    assert kept.stat().st_ino == kept_inode  # a complete chunk is not written again


def test_resume_refuses_other_settings(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    planes = write_planes(tmp_path / "planes", image_volume((40, 30, 20)))
    dest = tmp_path / "out"
    assert run(f"--source {planes} --dest {dest} --chunk-size 16,16,16 --jobs 1") == 0
    before = tree(dest)
    capsys.readouterr()
    assert run(f"--source {planes} --dest {dest} --chunk-size 16,16,8 --resume") == 2
    assert "other settings or source (scales differ)" in capsys.readouterr().err
    other = "--chunk-size 16,16,16 --compression zstd --resume"
    assert run(f"--source {planes} --dest {dest} {other}") == 2
    assert "compression" in capsys.readouterr().err
    assert tree(dest) == before


def test_force_writes_over_an_old_dataset(tmp_path: Path) -> None:
    planes = write_planes(tmp_path / "planes", image_volume((40, 30, 20)))
    dest = tmp_path / "out"
    assert run(f"--source {planes} --dest {dest} --chunk-size 16,16,16 --jobs 1") == 0
    (dest / "annotations").mkdir()
    (dest / "annotations" / "block_info.csv").write_text("20,15,10\n")
    assert run(f"--source {planes} --dest {dest} --chunk-size 32,32,32 --jobs 1 --force") == 0
    assert sorted(p.name for p in (dest / "1_1_1").iterdir()) == [
        "0-32_0-30_0-20.tiff",
        "32-40_0-30_0-20.tiff",
    ]
    assert (dest / "annotations" / "block_info.csv").read_text() == "20,15,10\n"


# -- Bad input --------------------------------------------------------------------------------


@pytest.fixture
def sources(tmp_path: Path) -> Path:
    """Good planes, and folders of planes that cannot make one volume."""
    plane = np.zeros((10, 12), np.uint16)
    write_planes(tmp_path / "good", np.stack([plane, plane]))
    odd = tmp_path / "shapes"
    odd.mkdir()
    tifffile.imwrite(odd / "a.tif", plane)
    tifffile.imwrite(odd / "b.tif", np.zeros((10, 13), np.uint16))
    types = tmp_path / "types"
    types.mkdir()
    tifffile.imwrite(types / "a.tif", plane)
    tifffile.imwrite(types / "b.tif", plane.astype(np.uint8))
    broken = tmp_path / "broken"
    broken.mkdir()
    tifffile.imwrite(broken / "a.tif", plane)
    (broken / "b.tif").write_bytes(b"this is not a TIFF file")
    colour = tmp_path / "colour"
    colour.mkdir()
    tifffile.imwrite(colour / "a.tif", np.zeros((10, 12, 3), np.uint8), photometric="rgb")
    full = tmp_path / "full"
    full.mkdir()
    (full / "notes.txt").write_text("keep me")
    return tmp_path


@pytest.mark.parametrize(
    ("source", "extra", "message"),
    [
        ("missing/*.tif", [], "no files match"),
        ("shapes", [], "planes differ: "),
        ("types", [], "uint16, but "),
        ("broken", [], "b.tif: not a readable TIFF file"),
        ("colour", [], "is not a single-channel plane"),
        ("good", ["--chunk-size", "64,64"], "--chunk-size must be three positive numbers"),
        ("good", ["--chunk-size", "0,64,64"], "--chunk-size must be three positive numbers"),
        ("good", ["--voxel-size", "1.8;1.8;2"], "--voxel-size must be three positive numbers"),
        ("good", ["--levels", "0"], "--levels must be at least 1"),
        ("good", ["--dest-is-full"], "is not empty: use --resume"),
        ("good", ["--resume", "--dest-is-full"], "no interrupted ingest to resume"),
        ("good", ["--segmentation", "--types-float"], "cannot make a segmentation"),
    ],
)
def test_bad_input_exits_2_with_a_message_and_writes_nothing(
    sources: Path,
    capsys: pytest.CaptureFixture[str],
    source: str,
    extra: list[str],
    message: str,
) -> None:
    dest = sources / "out"
    if "--dest-is-full" in extra:
        extra.remove("--dest-is-full")
        dest = sources / "full"
    if "--types-float" in extra:
        extra.remove("--types-float")
        source = "float"
        write_planes(sources / source, np.zeros((1, 4, 4), np.float32))
    before = tree(sources)
    status = run(f"--source '{sources / source}' --dest {dest} --jobs 1 {' '.join(extra)}")
    err = capsys.readouterr().err
    assert status == 2
    assert err.startswith("neurotrale-ingest: error: ")
    assert message in err
    assert tree(sources) == before
    assert not (sources / "out").exists()


def test_a_plane_that_fails_to_decode_stops_the_run_with_status_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Its header is fine, so the check before writing passes; its pixels are cut short.
    planes = write_planes(tmp_path / "planes", image_volume((40, 30, 20)))
    torn = planes / "plane17.tif"
    torn.write_bytes(torn.read_bytes()[:1000])
    assert run(f"--source {planes} --dest {tmp_path}/out --chunk-size 16,16,16 --jobs 1") == 1
    err = capsys.readouterr().err
    assert f"{torn}: cannot decode" in err
    assert "run the same command with --resume" in err


def test_command_line_exit_status(sources: Path) -> None:
    for argv in (
        ["--source", str(sources / "shapes"), "--dest", str(sources / "out")],
        ["--source", str(sources / "good")],  # no --dest
        ["--source", str(sources / "good"), "--dest", "x", "--resume", "--force"],
    ):
        done = subprocess.run(
            [sys.executable, "-m", "neurotrale_twisted.tools.ingest", *argv],
            capture_output=True,
            text=True,
            cwd=sources,
        )
        assert done.returncode == 2, done.stderr
        assert "neurotrale-ingest: error: " in done.stderr
        assert done.stdout == ""
    assert not (sources / "out").exists() and not (sources / "x").exists()
