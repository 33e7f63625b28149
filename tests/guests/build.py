"""Assemble the bare-metal guest programs with nasm into a cache, once per source version.

The cache key is a hash of the source, the shared include files, the defines and nasm's
version, so editing a guest rebuilds it and nothing else. The cache lives under
$BOITE_CACHE (default $XDG_CACHE_HOME/boite or ~/.cache/boite) in `guests/`.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from functools import cache
from pathlib import Path

GUEST_DIR = Path(__file__).resolve().parent


def cache_root() -> Path:
    if os.environ.get("BOITE_CACHE"):
        return Path(os.environ["BOITE_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "boite"


@cache
def _nasm_version() -> str:
    nasm = shutil.which("nasm")
    if nasm is None:
        raise RuntimeError("nasm is not installed (Debian package `nasm`)")
    return subprocess.run([nasm, "-v"], capture_output=True, text=True, check=True).stdout


def assemble(name: str, **defines: int | str) -> Path:
    """Path of tests/guests/NAME.asm assembled as a flat binary (built if not cached)."""
    src = GUEST_DIR / f"{name}.asm"
    if not src.exists():
        raise FileNotFoundError(src)
    h = hashlib.sha256(_nasm_version().encode())
    for part in [src, *sorted(GUEST_DIR.glob("*.inc"))]:
        h.update(part.name.encode() + b"\0" + part.read_bytes())
    for key, value in sorted(defines.items()):
        h.update(f"-D{key}={value}".encode())
    out_dir = cache_root() / "guests"
    out = out_dir / f"{name}-{h.hexdigest()[:16]}.bin"
    if out.exists():
        return out
    out_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=f".{name}-")
    os.close(fd)
    try:
        cmd = ["nasm", "-f", "bin", "-w-zeroing", f"-I{GUEST_DIR}/", "-o", tmp, str(src)]
        cmd += [f"-D{key}={value}" for key, value in defines.items()]
        subprocess.run(cmd, check=True, capture_output=True, text=True)
        os.replace(tmp, out)  # atomic: parallel test runs never see half a file
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out
