"""Which tier of the emulator runs hot guest code: the Python tiers (closures, jit.py's
compiled Python) or the native tier (native/: x86-64 host code).

One place decides, for every way of asking (see docs/architecture.md, "Emulator tiers"):

1. an explicit choice: `boite boot/start --emu-tier`, `EmuAccelerator(tier=...)`;
2. the environment: `BOITE_EMU_TIER` (`BOITE_EMU_NATIVE=1|0`, the older spelling, means
   native|python);
3. the box: `boite.emuTier` in the .vmx;
4. "auto".

"python" forces the Python tiers (for debugging the translator away). "native" asks for
the native tier; "auto" (the default) takes it where the host allows it, as long as
`NATIVE_BY_DEFAULT` is set. Where the host cannot run it (not x86-64 Linux, no executable
memory) or the Python interpreter is chosen (`BOITE_EMU=interp`), the Python tiers run and
the choice says why: `boite info` and vmware.log print it.
"""

from __future__ import annotations

import os
import platform
import sys
from dataclasses import dataclass

from boite.errors import AccelError

TIERS = ("auto", "python", "native")
ENV = "BOITE_EMU_TIER"
VMX_KEY = "boite.emuTier"
# Whether "auto" means the native tier (where the host allows it). On: it runs the guests
# that matter about three times faster in CPU time than the Python tiers (bench/RESULTS.md),
# and the crash fuzz (tests/accel/test_native_fuzz.py: hostile random code in real, 16- and
# 32-bit modes, every run compared with the Python tier) finds no run that ends otherwise
# since the fixes of Dec 7 (totals in the test's notes). `--emu-tier python`,
# BOITE_EMU_TIER=python or boite.emuTier = "python" force the Python tiers.
NATIVE_BY_DEFAULT = True


@dataclass(frozen=True)
class TierChoice:
    tier: str  # what runs: "python" or "native"
    asked: str  # what was asked: auto, python or native
    source: str  # who asked: "--emu-tier", "BOITE_EMU_TIER", "boite.emuTier", "default", ...
    why: str  # one line on why this tier runs (a refused native tier says its reason)

    def describe(self) -> str:
        return f"{self.tier} ({self.why})"


def check_tier(value: str, where: str) -> str:
    folded = value.strip().lower()
    if folded not in TIERS:
        raise AccelError(f"{where} = {value!r}: expected one of {', '.join(TIERS)}")
    return folded


def native_refusal() -> str | None:
    """Why this host cannot run the native tier, or None when it can."""
    machine = platform.machine()
    if sys.platform != "linux" or machine not in ("x86_64", "AMD64"):
        return f"the native tier needs an x86-64 Linux host, this is {sys.platform}/{machine}"
    from boite.accel.emu.native.state import CodeArena
    from boite.accel.emu.native.translate import host_lahf

    if not host_lahf():
        return "the native tier needs LAHF/SAHF in 64-bit mode (CPUID lahf_lm), absent here"

    try:
        CodeArena(4096)
    except (OSError, ValueError) as exc:
        return f"executable memory is refused here ({exc})"
    return None


def _asked(explicit: str | None, config: str | None) -> tuple[str, str]:
    if explicit is not None:
        return check_tier(explicit, "--emu-tier"), "--emu-tier"
    env = os.environ.get(ENV)
    if env:
        return check_tier(env, ENV), ENV
    legacy = os.environ.get("BOITE_EMU_NATIVE")
    if legacy is not None:
        return ("native" if legacy == "1" else "python"), "BOITE_EMU_NATIVE"
    if config is not None:
        return check_tier(config, VMX_KEY), VMX_KEY
    return "auto", "default"


def choose_tier(
    explicit: str | None = None, config: str | None = None, *, translate: bool = True
) -> TierChoice:
    """The tier an emulator made now runs (see the module's docstring for the order)."""
    asked, source = _asked(explicit, config)
    by = f"{source} = {asked}" if source != "default" else "the default, auto"
    if asked == "python":
        return TierChoice("python", asked, source, f"{by}: the Python tiers are forced")
    if not translate:
        return TierChoice("python", asked, source,
                          f"{by}, but BOITE_EMU=interp runs the plain interpreter")  # fmt: skip
    if asked == "auto" and not NATIVE_BY_DEFAULT:
        return TierChoice("python", asked, source,
                          f"{by}: the native tier is opt-in (--emu-tier native)")  # fmt: skip
    refused = native_refusal()
    if refused is not None:
        return TierChoice("python", asked, source, f"{by}, refused: {refused}")
    return TierChoice("native", asked, source, f"{by}: hot blocks run as x86-64 code")
