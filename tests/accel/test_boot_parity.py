"""`boite boot --accel emu` against `boite boot --accel kvm`: the same multiboot kernel
must print the same COM1 transcript and end with the same exit status.

KVM runs the guest on the host CPU, so for these kernels the real CPU is the reference.
On this project's kvm_pvm (software nested KVM) only straight-line code with port I/O
runs: no IRET, no paging turned on by the guest, no interrupt delivery, and not even
INT3, BOUND or DAA, so the kernels here keep to that (exceptions reach their IDT handler,
which jumps on instead of returning). On real VT-x/AMD-V every kernel of the QEMU TCG
suite (tcg_guests/) is compared as well.
"""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from conftest import requires_kvm, requires_real_vtx
from guests.build import assemble

GUESTS = Path(__file__).parent / "tcg_guests"
MEMSIZE_MB = 64
TIMEOUT_S = 60

pytestmark = [requires_kvm]
pytest.importorskip("boite.machine.builder", reason="needs the machine builder")


def _nasm(src: Path, out_dir: Path) -> Path:
    out = out_dir / f"{src.parent.name}_{src.stem}.bin"
    subprocess.run(
        ["nasm", "-f", "bin", "-I", f"{GUESTS}/", "-o", str(out), str(src)],
        check=True,
        capture_output=True,
    )
    return out


def boot(image: Path, accel: str, mode: str = "translate", *args: str, input: bytes = b""):
    """(exit status, stdout, stderr) of `boite boot --accel ACCEL IMAGE`."""
    env = dict(os.environ, BOITE_EMU=mode, BOITE_EMU_HOT="2")  # every block compiled
    p = subprocess.run(
        [sys.executable, "-m", "boite", "boot", "--accel", accel, "--memsize", str(MEMSIZE_MB),
         *args, str(image)],
        input=input, capture_output=True, timeout=TIMEOUT_S, env=env,
    )  # fmt: skip
    return p.returncode, p.stdout, p.stderr.decode(errors="replace")


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("parity")
    found = {f"parity/{p.stem}": _nasm(p, out) for p in sorted((GUESTS / "parity").glob("*.asm"))}
    found.update({f"tcg/{p.stem}": _nasm(p, out) for p in sorted(GUESTS.glob("*.asm"))})
    for name in ("mb_echo", "mb_poweroff", "mb_halt"):
        found[f"guests/{name}"] = assemble(name)
    return found


@pytest.fixture(scope="module")
def kvm_runs(images):
    cache: dict[tuple, tuple[int, bytes, str]] = {}

    def run(name: str, *args: str, input: bytes = b"") -> tuple[int, bytes, str]:
        key = (name, args, input)
        if key not in cache:
            cache[key] = boot(images[name], "kvm", "translate", *args, input=input)
        return cache[key]

    return run


MODES = ("translate", "interp")


@pytest.fixture(scope="module")
def emu_runs(images):
    """Both emulator paths of a case at once (independent processes), cached; on the
    native tier (BOITE_EMU_TIER, see conftest.py) only the translating path has one."""
    cache: dict[tuple, tuple[int, bytes, str]] = {}

    def run(name: str, mode: str, *args: str, input: bytes = b"") -> tuple[int, bytes, str]:
        tier = os.environ.get("BOITE_EMU_TIER")
        key = (name, args, input, tier)
        if (key, mode) not in cache:
            modes = MODES if tier != "native" else ("translate",)
            with ThreadPoolExecutor(max_workers=len(modes)) as pool:
                results = pool.map(
                    lambda m: boot(images[name], "emu", m, *args, input=input), modes
                )
                cache.update({(key, m): r for m, r in zip(modes, results, strict=True)})
        return cache[key, mode]

    return run


# (kernel, extra boot arguments, stdin)
CASES = [
    ("parity/handoff", ("--append", "parity check"), b""),
    ("parity/compute", (), b""),
    ("parity/faults", (), b""),
    ("parity/segchecks", (), b""),
    ("guests/mb_echo", (), b""),
    ("guests/mb_echo", (), b"typed into COM1\n"),
    ("guests/mb_poweroff", (), b""),
    ("guests/mb_halt", (), b""),
]


def _ids(case) -> str:
    values = case.values if hasattr(case, "values") else case
    name, _, stdin = values
    return name + ("+stdin" if stdin else "")


@pytest.mark.emu_tiers
@pytest.mark.parametrize("mode", MODES, ids=["translated", "interpreted"])
@pytest.mark.parametrize(("name", "args", "stdin"), CASES, ids=[_ids(c) for c in CASES])
def test_emu_boot_matches_kvm(kvm_runs, emu_runs, name, args, stdin, mode):
    k_status, k_out, k_err = kvm_runs(name, *args, input=stdin)
    assert "error" not in k_err, k_err  # KVM itself must have run the kernel
    e_status, e_out, e_err = emu_runs(name, mode, *args, input=stdin)
    assert "error" not in e_err, e_err
    assert e_out.decode(errors="replace") == k_out.decode(errors="replace")
    assert e_status == k_status


def test_parity_kernels_end_with_their_own_exit_code(kvm_runs):
    """The real CPU ran each parity kernel to its end ("done", its EXIT_CODE)."""
    for name, code in (("parity/compute", 0x53), ("parity/faults", 0x52)):
        status, out, _ = kvm_runs(name)
        assert out.endswith(b"done\n") and status == (code << 1) | 1, (name, status, out)


@requires_real_vtx
@pytest.mark.emu_tiers
@pytest.mark.parametrize("name", sorted(p.stem for p in GUESTS.glob("*.asm")))
def test_tcg_kernels_match_under_real_vtx(images, kvm_runs, name):
    """With real VT-x/AMD-V (IRET, paging, interrupts work under KVM), the QEMU TCG
    suite's kernels must also run the same under KVM and the emulator."""
    k_status, k_out, k_err = kvm_runs(f"tcg/{name}")
    assert "error" not in k_err, k_err
    e_status, e_out, _ = boot(images[f"tcg/{name}"], "emu")
    assert e_out == k_out and e_status == k_status
