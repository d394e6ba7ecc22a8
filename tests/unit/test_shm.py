"""ps.shm: the areas of a segment, and the checks a server makes before it maps one."""

import os

import pytest

from ps import shm
from ps.errors import InvalidArgument, ShmUnavailable


def test_areas_are_handed_out_apart_merged_when_given_back_and_abandoned_ones_never_return():
    a = shm.Areas(64, 64 + 10 * shm.ALIGN)
    x, y, z = a.take(1), a.take(shm.ALIGN + 1), a.take(3 * shm.ALIGN)
    assert (x, y, z) == (64, 64 + shm.ALIGN, 64 + 3 * shm.ALIGN)
    assert a.take(5 * shm.ALIGN) is None  # 4 left
    a.give_back(x)
    a.give_back(y)
    assert a.free[0] == (64, 64 + 3 * shm.ALIGN)  # merged
    a.abandon(z)
    assert a.take(4 * shm.ALIGN) == 64 + 6 * shm.ALIGN  # z's area is not among the free ones
    assert a.take(3 * shm.ALIGN) == 64
    assert a.take(1) is None


def test_a_server_maps_only_a_private_segment_holding_the_workers_nonce():
    seg = shm.Segment.create(1 << 16)
    try:
        assert os.stat(seg.path).st_mode & 0o777 == 0o600
        with pytest.raises(ShmUnavailable, match="nonce"):
            shm.Segment.attach(seg.name, b"\0" * 16)
        os.chmod(seg.path, 0o644)
        with pytest.raises(InvalidArgument, match="mode 0600"):
            shm.Segment.attach(seg.name, seg.worker_nonce)
        os.chmod(seg.path, 0o600)
        with pytest.raises(InvalidArgument, match="at most"):
            shm.Segment.attach(seg.name, seg.worker_nonce, max_size=1 << 10)
        mapped = shm.Segment.attach(seg.name, seg.worker_nonce)
        assert not os.path.exists(seg.path)  # unlinked once mapped
        assert mapped.server_nonce == seg.server_nonce != bytes(16)  # each sees the other's writes
        mapped.write(4096, [b"abc", memoryview(b"def")])
        assert bytes(seg.view(4096, 6)) == b"abcdef" and seg.read(4096, 3) == b"abc"
        with pytest.raises(InvalidArgument, match="outside"):
            mapped.read(seg.size - 2, 4)
        mapped.close()
    finally:
        seg.unlink()
        seg.close()


@pytest.mark.parametrize("name", ["../etc/passwd", "ps-" + "0" * 31, "ps-" + "g" * 32, "x" * 40])
def test_a_name_that_is_not_a_segments_is_refused_before_anything_is_opened(name):
    with pytest.raises(InvalidArgument, match="must match"):
        shm.Segment.attach(name, bytes(16))


def test_a_link_in_place_of_a_segment_is_not_followed(tmp_path):
    target = tmp_path / "secret"
    target.write_bytes(b"\0" * 4096)
    name = "ps-" + "a" * 32
    os.symlink(target, os.path.join(shm.SHM_DIR, name))
    try:
        with pytest.raises(ShmUnavailable):
            shm.Segment.attach(name, bytes(16))
    finally:
        os.unlink(os.path.join(shm.SHM_DIR, name))


def test_the_host_identity_names_the_network_namespace_and_dev_shm():
    ident = shm.host_identity()
    assert f"net={os.stat('/proc/self/ns/net').st_ino}" in ident and "shm=" in ident and "uid=" in ident
