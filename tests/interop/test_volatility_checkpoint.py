"""volatility3 (from PyPI) reads the .vmsn/.vmss + .vmem pairs boite writes as guest RAM."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from boite.accel.cpustate import CpuState
from boite.box.checkpoint import write_checkpoint
from boite.machine.memory import GuestMemory

vol_contexts = pytest.importorskip("volatility3.framework.contexts")
from volatility3.framework.layers import physical, vmware  # noqa: E402

MiB = 1 << 20


def file_layer(ctx, name: str, path: Path) -> str:
    ctx.config[f"layers.{name}.location"] = path.resolve().as_uri()
    ctx.layers.add_layer(physical.FileLayer(ctx, f"layers.{name}", name))
    return name


def vmware_layer(vmem: Path, meta: Path):
    """Stack volatility3's VmwareLayer by hand: RAM file as base, checkpoint as metadata."""
    ctx = vol_contexts.Context()
    base = file_layer(ctx, "base", vmem)
    meta_name = file_layer(ctx, "meta", meta)
    ctx.config["layers.vm.base_layer"] = base
    ctx.config["layers.vm.meta_layer"] = meta_name
    layer = vmware.VmwareLayer(ctx, "layers.vm", "vm")
    ctx.layers.add_layer(layer)
    return layer


def guest_with_hole() -> GuestMemory:
    """Low RAM, then RAM above 4 GiB, as a PC with a 32-bit MMIO hole has it."""
    mem = GuestMemory()
    mem.add_region(0, 4 * MiB)
    mem.add_region(1 << 32, 2 * MiB)
    for r in mem.regions:
        # Data pages with zero pages between them, so the .vmem is sparse.
        for page in range(0, r.size, 3 * 4096):
            mem.write(r.gpa + page, os.urandom(4096))
    return mem


def test_volatility_reads_guest_ram(tmp_path) -> None:
    mem = guest_with_hole()
    vmsn, vmem = tmp_path / "box-Snapshot1.vmsn", tmp_path / "box-Snapshot1.vmem"
    write_checkpoint(vmsn, vmem, [CpuState()], mem, {"uart": {"lcr": 3}})
    layer = vmware_layer(vmem, vmsn)
    for r in mem.regions:
        assert layer.read(r.gpa, r.size) == mem.read(r.gpa, r.size)
        assert layer.is_valid(r.gpa, r.size)
    assert not layer.is_valid(4 * MiB, 4096)  # the hole is not RAM to volatility either
    assert layer.maximum_address == (1 << 32) + 2 * MiB - 1


def test_volatility_stacker_finds_the_suspend_file(tmp_path) -> None:
    """Its automagic pairs NAME.vmem with NAME.vmss (suspend) or NAME.vmsn (snapshot)."""
    mem = GuestMemory.with_ram(8 * MiB)
    mem.write(0x7C00, b"\xeb\xfe" + b"boite" * 100)
    vmss, vmem = tmp_path / "box.vmss", tmp_path / "box.vmem"
    write_checkpoint(vmss, vmem, [CpuState(), CpuState()], mem, {})
    ctx = vol_contexts.Context()
    name = file_layer(ctx, "file", vmem)
    layer = vmware.VmwareStacker.stack(ctx, name)
    assert isinstance(layer, vmware.VmwareLayer)
    assert layer.read(0, 8 * MiB) == mem.read(0, 8 * MiB)
