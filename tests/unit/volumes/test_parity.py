"""Recovery volumes: any N lost or damaged volumes give back the exact bundle, on the fly, and say so."""

from __future__ import annotations

import itertools
import random
import sys
from pathlib import Path

import pytest

from airgap.bundle.container import read_head, read_payload
from airgap.errors import VolumeError
from airgap.volumes import copy_bundle, open_bundle, read_index, scan_volumes, split_bundle
from airgap.volumes.parity import MAX_SHARES, ParityCode, stripe_size_for
from tests.unit.volumes.test_volumes import SEGMENT, Bundle, expect_open_error, expect_read_error, flip, make_bundle

VOLUME = 50_000  # a ~300 KB bundle: 7 data volumes of 13 segments each, + 2 recovery volumes


# ---------------------------------------------------------------- the code itself

def test_any_k_shares_decode_the_data() -> None:
    rng = random.Random(7)
    code = ParityCode(4, 2)
    data = [rng.randbytes(1000) for _ in range(4)]
    shares = data + code.encode(data)
    for kept in itertools.combinations(range(6), 4):
        assert code.decode({i: shares[i] for i in kept}) == data


def test_code_refuses_what_zfec_would_get_wrong() -> None:
    code = ParityCode(2, 1)
    with pytest.raises(VolumeError, match="share numbers out of range"):
        code.decode({0: b"ab", 5: b"cd"})  # zfec itself would decode garbage
    with pytest.raises(VolumeError, match="differ in length"):
        code.decode({0: b"ab", 2: b"c"})
    with pytest.raises(VolumeError, match="needs 2 intact shares, found 1"):
        code.decode({0: b"ab"})
    with pytest.raises(VolumeError, match="at most 256 data and recovery volumes"):
        ParityCode(250, 7)


def test_stripe_size_divides_segments_and_bounds_memory() -> None:
    for k in (1, 7, 13, 100, 255):
        for segment in (4096, 1 << 20, 16 << 20):
            stripe = stripe_size_for(k, segment)
            assert segment % stripe == 0 and stripe & (stripe - 1) == 0
            assert stripe * k <= max(64 << 20, 4096 * k)
    assert MAX_SHARES == 256


# ---------------------------------------------------------------- volume sets with recovery volumes

@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Bundle:
    return make_bundle(tmp_path_factory.mktemp("bundle"))


@pytest.fixture(scope="module")
def pristine(bundle: Bundle, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("pristine")
    split_bundle(bundle.path, out, VOLUME, parity=2, segment_size=SEGMENT)
    return out


def fresh_copy(pristine: Path, tmp_path: Path) -> Path:
    out = tmp_path / "set"
    out.mkdir(parents=True)
    for path in pristine.iterdir():
        (out / path.name).write_bytes(path.read_bytes())
    return out


def share_names(folder: Path) -> list[str]:
    index = read_index(folder / "demo-1.0.airgap.volumes.json")
    return [v.name for v in index.files]


def read_with_repairs(path: Path) -> tuple[bytes, list[str]]:
    with open_bundle(path) as stream:
        data = stream.read()
        return data, [str(r) for r in stream.repaired]


def test_any_two_volumes_deleted(bundle: Bundle, pristine: Path, tmp_path: Path) -> None:
    names = share_names(pristine)
    assert len(names) == 9
    for pair in itertools.combinations(range(9), 2):
        folder = fresh_copy(pristine, tmp_path / "-".join(map(str, pair)))
        for i in pair:
            (folder / names[i]).unlink()
        data, repaired = read_with_repairs(folder)
        assert data == bundle.data, pair
        lost_data = [i for i in pair if i < 7]
        assert [r.split(": ")[0] for r in repaired] == [f"volume {i + 1} of 7 ({names[i]})" for i in lost_data]
        assert all("missing from" in r and "rebuilt" in r for r in repaired)


def test_any_two_volumes_corrupted_at_the_same_place(bundle: Bundle, pristine: Path, tmp_path: Path) -> None:
    names = share_names(pristine)
    for pair in itertools.combinations(range(9), 2):
        folder = fresh_copy(pristine, tmp_path / "-".join(map(str, pair)))
        for i in pair:
            flip(folder / names[i], 9000)  # same segment (and stripe) in both: the hardest case
        data, repaired = read_with_repairs(folder)
        assert data == bundle.data, pair
        expected = [f"volume {i + 1} of 7 ({names[i]}): sha256 mismatch in bytes 8192-12287: expected"
                    for i in pair if i < 7]
        assert [r[: len(e)] for r, e in zip(repaired, expected, strict=True)] == expected
        assert all(r.endswith("rebuilt 4096 bytes from the recovery volumes") for r in repaired)


def test_one_deleted_one_corrupted_and_the_bundle_reader_on_top(bundle: Bundle, pristine: Path,
                                                                 tmp_path: Path) -> None:
    folder = fresh_copy(pristine, tmp_path)
    names = share_names(folder)
    (folder / names[0]).unlink()  # the head itself
    flip(folder / names[6], 100)  # the short last volume
    with open_bundle(folder / names[3]) as stream:
        head, tar = read_head(stream)
        read_payload(tar, head.manifest)  # what install does: every file's hash checked
        repaired = stream.repaired
    assert [r.volume for r in repaired] == [f"volume 1 of 7 ({names[0]})", f"volume 7 of 7 ({names[6]})"]
    assert repaired[0].rebuilt_bytes == VOLUME and repaired[1].rebuilt_bytes == SEGMENT


def test_damage_spread_over_more_volumes_than_recovery_volumes(bundle: Bundle, pristine: Path,
                                                               tmp_path: Path) -> None:
    """Repair is per segment: five damaged volumes are fine while no segment has more than two."""
    folder = fresh_copy(pristine, tmp_path)
    names = share_names(folder)
    for i in range(5):
        flip(folder / names[i], i * 2 * SEGMENT + 17)
    data, repaired = read_with_repairs(folder)
    assert data == bundle.data and len(repaired) == 5


def test_truncated_volume_and_damaged_recovery_volume(bundle: Bundle, pristine: Path, tmp_path: Path) -> None:
    folder = fresh_copy(pristine, tmp_path)
    names = share_names(folder)
    (folder / names[2]).write_bytes((folder / names[2]).read_bytes()[:10_000])
    flip(folder / names[8], 30_000)
    data, repaired = read_with_repairs(folder)
    assert data == bundle.data
    assert repaired == [f"volume 3 of 7 ({names[2]}): truncated: expected 50000 bytes, found 10000; "
                        "rebuilt 50000 bytes from the recovery volumes"]


def test_three_volumes_missing_is_refused_up_front(pristine: Path, tmp_path: Path) -> None:
    folder = fresh_copy(pristine, tmp_path)
    names = share_names(folder)
    for i in (1, 4, 7):
        (folder / names[i]).unlink()
    expect_open_error(folder, r"^3 volumes damaged, the 2 recovery volume\(s\) can rebuild at most 2: volume 2 of 7 "
                              r".*; volume 5 of 7 .*; recovery volume 1 of 2 \(demo-1.0.airgap.r01\): missing")


def test_three_volumes_damaged_at_the_same_place(pristine: Path, tmp_path: Path) -> None:
    folder = fresh_copy(pristine, tmp_path)
    names = share_names(folder)
    for i in (1, 2, 8):
        flip(folder / names[i], 4100)
    expect_read_error(folder, r"^volume 2 of 7 \(demo-1.0.airgap.002\): sha256 mismatch in bytes 4096-8191: .*; "
                              r"the recovery volumes cannot rebuild it: 3 of 9 volumes are damaged at that place, "
                              r"at most 2 can be rebuilt$", VOLUME + SEGMENT)


def test_undamaged_set_reads_each_data_volume_once_and_no_recovery_volume(pristine: Path, tmp_path: Path) -> None:
    folder = fresh_copy(pristine, tmp_path)
    opened: list[str] = []
    recording = [False]

    def audit(event: str, args: tuple[object, ...]) -> None:
        if recording[0] and event == "open" and isinstance(args[0], (str, Path)):
            opened.append(Path(args[0]).name)

    sys.addaudithook(audit)
    recording[0] = True
    try:
        data, repaired = read_with_repairs(folder)
    finally:
        recording[0] = False
    names = share_names(folder)
    assert repaired == [] and len(data) == sum((folder / n).stat().st_size for n in names[:7])
    volumes = [n for n in opened if n.startswith("demo-1.0.airgap.") and not n.endswith(".json")]
    assert sorted(volumes) == names[:7]  # one open per data volume (head check included); recovery volumes untouched


def test_index_from_another_build_with_recovery_volumes(bundle: Bundle, pristine: Path, tmp_path: Path) -> None:
    folder = fresh_copy(pristine, tmp_path)
    other = make_bundle(tmp_path / "other", seed=9, key=bundle.key)
    split_bundle(other.path, tmp_path / "other-set", VOLUME, parity=2, segment_size=SEGMENT)
    index = "demo-1.0.airgap.volumes.json"
    (folder / index).write_bytes((tmp_path / "other-set" / index).read_bytes())
    expect_open_error(folder, "the index and the volumes come from different builds")


def test_one_volume_with_recovery_volumes(bundle: Bundle, tmp_path: Path) -> None:
    split_bundle(bundle.path, tmp_path, None, parity=1, segment_size=SEGMENT)
    (tmp_path / "demo-1.0.airgap.001").unlink()
    data, repaired = read_with_repairs(tmp_path)
    assert data == bundle.data and len(repaired) == 1


def test_too_many_volumes_for_recovery(bundle: Bundle, tmp_path: Path) -> None:
    with pytest.raises(VolumeError, match="too many volumes for recovery data: .* found 450 data \\+ 2 recovery"):
        split_bundle(bundle.path, tmp_path, 700, parity=2, segment_size=SEGMENT)


def test_copy_with_parity_then_lose_two_volumes_on_the_stick(bundle: Bundle, tmp_path: Path) -> None:
    stick = tmp_path / "stick"
    report = copy_bundle(bundle.path, stick, 40_000, parity=2, progress=False, segment_size=SEGMENT)
    assert [v.name for v in report.index.recovery] == ["demo-1.0.airgap.r01", "demo-1.0.airgap.r02"]
    assert set(report.written) == {v.name for v in report.index.files}
    again = copy_bundle(bundle.path, stick, 40_000, parity=2, progress=False, segment_size=SEGMENT)
    assert again.written == () and again.bytes_written == 0  # recovery volumes too are compared, not rewritten
    (stick / "demo-1.0.airgap.004").unlink()
    flip(stick / "demo-1.0.airgap.006", 39_999)
    data, repaired = read_with_repairs(stick / "demo-1.0.airgap.001")
    assert data == bundle.data and len(repaired) == 2
    # copying from the damaged stick repairs on the way: the new set is whole again
    fixed = copy_bundle(stick, tmp_path / "stick2", 40_000, parity=2, progress=False, segment_size=SEGMENT)
    assert read_with_repairs(tmp_path / "stick2") == (bundle.data, [])
    assert [v.sha256 for v in fixed.index.files] == [v.sha256 for v in report.index.files]


def test_scan_names_every_damaged_file_recovery_volumes_included(pristine: Path, tmp_path: Path) -> None:
    folder = fresh_copy(pristine, tmp_path)
    assert scan_volumes(folder).damaged == ()
    names = share_names(folder)
    flip(folder / names[8], 5)
    flip(folder / names[8], 45_000)
    (folder / names[3]).unlink()
    scan = scan_volumes(folder / names[0])
    assert scan.readable
    assert scan.damaged == (
        (f"volume 4 of 7 ({names[3]})", f"missing from {folder}"),
        (f"recovery volume 2 of 2 ({names[8]})", scan.damaged[1][1]),
    )
    assert scan.damaged[1][1].startswith("sha256 mismatch in bytes 0-4095: expected ")
    assert scan.damaged[1][1].endswith("(and 1 more damaged segment(s))")
    (folder / names[5]).unlink()
    assert not scan_volumes(folder).readable
