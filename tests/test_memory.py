"""How much memory there is: the kernel's figure, or a smaller cgroup limit."""

import pytest

import layerprune.runtime.memory as memory
from layerprune.runtime.memory import fits_in_memory


def test_a_size_fits_when_it_takes_at_most_the_stated_share_of_the_memory_available(monkeypatch):
    monkeypatch.setattr(memory, "memory_available", lambda: 1000)
    assert fits_in_memory(int(1000 * memory.FIT_SHARE))
    assert not fits_in_memory(int(1000 * memory.FIT_SHARE) + 1)


@pytest.mark.parametrize("version", [1, 2])
def test_memory_limits_are_read_from_the_cgroup_and_its_parents(tmp_path, version):
    from layerprune.runtime.memory import cgroup_limits

    proc = tmp_path / "cgroup"
    root = tmp_path / "sys" / ("memory" if version == 1 else "")
    name = "memory.limit_in_bytes" if version == 1 else "memory.max"
    proc.write_text("4:memory:/job/step\n" if version == 1 else "0::/job/step\n")
    (root / "job" / "step").mkdir(parents=True)
    (root / "job" / "step" / name).write_text("max\n" if version == 2 else "9223372036854771712\n")
    (root / "job" / name).write_text("3221225472\n")
    assert cgroup_limits(proc, tmp_path / "sys") == [3 * 2**30]
    assert cgroup_limits(tmp_path / "missing", tmp_path / "sys") == []
