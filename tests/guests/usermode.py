"""Linux i386 user programs on the emulated CPU, without a kernel: a test tool.

The emulated CPU runs a real i386 ELF program (Debian's own binaries: `ld-linux.so.2`,
busybox, python3) at CPL 3 under 2-level paging (or PAE with NX on every page that is
not executable, as Debian's 686-pae kernel maps them: `pae=True`), and this module plays
the kernel:
- the ELF loader (the program, and its interpreter when it names one) and the initial
  stack (argv, envp, auxv) as Linux's binfmt_elf builds them;
- demand paging as Linux does it: nothing is mapped until the program touches it, a read
  of a private writable page maps it read-only and the first write upgrades it (so every
  instruction that faults half-way is restarted, as under a real kernel), and the frames
  come from a shuffled pool, so that pages adjacent in linear memory are not adjacent in
  guest-physical memory;
- the system calls those programs make (files under a root directory, brk, mmap2,
  set_thread_area with a GDT TLS entry for %gs, ...), entered through INT 0x80 with a real
  IDT, TSS and ring-0 stubs, returning with IRET;
- optionally, a "timer interrupt" every N instructions whose ring-0 handler saves the
  FPU/SSE state with FXSAVE, scrubs the registers and restores them with FXRSTOR, as a
  context switch does.

A guest program's fault that the "kernel" cannot resolve ends the run as SIGSEGV would
(UserExit.signal). Usage:

    run = UserMode(root=Path("/tmp/root"), translate=True)
    result = run.execute(["/usr/bin/python3.11", "-c", "print(1.5*3)"], env=[...])
    result.status, result.stdout

Everything is deterministic (fixed time, fixed "random" bytes), so two runs of one
program execute the same instructions.
"""

from __future__ import annotations

import errno
import os
import random
import struct
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from boite.accel.emu.cpu import Cpu
from boite.machine.memory import GuestMemory

PAGE = 4096
M32 = 0xFFFFFFFF

# Linear layout (as a 3G/1G i386 Linux): user below 0xC0000000.
STACK_TOP = 0xC0000000
STACK_PAGES = 2048  # 8 MiB, Linux's default RLIMIT_STACK
MMAP_BASE = 0xB7800000
PIE_BASE = 0x80000000 // 3 * 2 & ~0xFFF  # ELF_ET_DYN_BASE (TASK_SIZE / 3 * 2)
KERNEL = 0xFFC00000  # stubs, ring-0 stack, GDT/IDT/TSS, FXSAVE area (supervisor pages)
STUBS = KERNEL
KSTACK_TOP = KERNEL + 3 * PAGE
TABLES = KERNEL + 3 * PAGE  # GDT at +0, IDT at +0x100, TSS at +0x900
GDT = TABLES
IDT = TABLES + 0x100
TSS = TABLES + 0x900
FXAREA = KERNEL + 4 * PAGE
KERNEL_PAGES = 5

KCS, KDS, UCS, UDS = 0x08, 0x10, 0x1B, 0x23
TLS_FIRST = 6  # GDT_ENTRY_TLS_MIN on i386 Linux
TIMER_VEC = 0x20
ERRCODE_VECS = {8, 10, 11, 12, 13, 14, 17}

PROT_READ, PROT_WRITE, PROT_EXEC = 1, 2, 4
MAP_SHARED, MAP_PRIVATE, MAP_FIXED, MAP_ANONYMOUS = 0x01, 0x02, 0x10, 0x20
MAP_FIXED_NOREPLACE = 0x100000
AT_FDCWD = -100 & M32
O_ACCMODE, O_CREAT, O_EXCL, O_TRUNC, O_APPEND = 3, 0o100, 0o200, 0o1000, 0o2000
O_DIRECTORY = 0o200000


class UserExit(Exception):
    """The program ended (exit_group, or a signal the harness delivers as death)."""


@dataclass
class Result:
    status: int | None  # exit status, None if killed
    signal: int | None
    stdout: bytes
    stderr: bytes
    instructions: int
    syscalls: list[tuple[int, int]] = field(default_factory=list)  # (number, result)
    unknown_syscalls: set[int] = field(default_factory=set)
    fault: str = ""


@dataclass
class Page:
    """One page of a mapping: its protection, where its contents come from (a file's
    bytes from an offset, bytes past `valid` being zero) and its frame once touched."""

    prot: int
    src: bytes | None = None
    off: int = 0
    valid: int = 0
    frame: int | None = None
    writable_now: bool = False


@dataclass
class OpenFile:
    path: Path
    data: bytearray | None  # file contents (regular files), None for directories
    pos: int = 0
    flags: int = 0
    dirents: list[tuple[str, int, int]] | None = None  # (name, ino, d_type)
    dirty: bool = False


def _stub_code(vec: int) -> bytes:
    """The ring-0 handler of a vector: HLT (the harness takes over), drop the error code,
    IRET. The timer's saves and scrubs the FPU/SSE state as a context switch does."""
    if vec == TIMER_VEC:
        code = b"\x0f\xae\x05" + struct.pack("<I", FXAREA)  # fxsave [FXAREA]
        code += b"\xdb\xe3"  # fninit
        for r in range(8):
            code += bytes([0x66, 0x0F, 0xEF, 0xC0 | r << 3 | r])  # pxor xmmR, xmmR
        code += b"\x0f\xae\x0d" + struct.pack("<I", FXAREA)  # fxrstor [FXAREA]
        return code + b"\xcf"
    code = b"\xf4"
    if vec in ERRCODE_VECS:
        code += b"\x83\xc4\x04"  # add esp, 4
    return code + b"\xcf"


STUB_SIZE = 16
TIMER_STUB = FXAREA + 512  # the timer's handler is longer than a slot


class UserMode:
    """One process's address space and kernel personality on an emulated CPU."""

    def __init__(
        self,
        root: Path,
        *,
        translate: bool = True,
        ram_mib: int = 512,
        seed: int = 1,
        timer_every: int = 0,
        trace_syscalls: bool = False,
        pae: bool = False,
    ) -> None:
        self.root = root.resolve()
        self.pae = pae
        self.mem = GuestMemory.with_ram(ram_mib << 20)
        self.cpu = Cpu(self.mem, translate=translate)
        self.timer_every = timer_every
        self.trace = trace_syscalls
        nframes = (ram_mib << 20) // PAGE
        frames = list(range(1024, nframes))  # the first 4 MiB: page tables, kernel
        random.Random(seed).shuffle(frames)
        self.free_frames = frames
        self.table_frames = list(range(5, 1024))  # 0: directory (PAE: PDPT), 1-4: PAE's
        self.pd = 0  # page directory at frame 0
        self.pages: dict[int, Page] = {}
        self.brk_start = self.brk = 0
        self.mmap_hint = MMAP_BASE
        self.fds: dict[int, OpenFile | str] = {0: "stdin", 1: "stdout", 2: "stderr"}
        self.stdout = bytearray()
        self.stderr = bytearray()
        self.cwd = "/"
        self.exe = ""  # the program's path in the root (readlink /proc/self/exe)
        self.rng = random.Random(seed)
        self.clock_ns = 1_700_000_000_000_000_000
        self.syscalls: list[tuple[int, int]] = []
        self.unknown: set[int] = set()
        self.status: int | None = None
        self.signal: int | None = None
        self.fault = ""
        self._last_fault: tuple[int, int, int | None] | None = None
        self._fault_repeats = 0
        self._kernel_setup()

    # ------------------------------------------------------------------ paging
    def _frame(self) -> int:
        return self.free_frames.pop()

    def _pte_addr(self, vpn: int, create: bool) -> int | None:
        if self.pae:  # the PDPT's four page directories exist from the start
            pde_a = (self.pd + 1 + (vpn >> 18)) * PAGE + ((vpn >> 9) & 511) * 8
        else:
            pde_a = self.pd * PAGE + (vpn >> 10) * 4
        pde = self.mem.read_u32(pde_a)
        if not pde & 1:
            if not create:
                return None
            t = self.table_frames.pop()
            self.mem.write(t * PAGE, bytes(PAGE))
            self.mem.write_u32(pde_a, t * PAGE | 7)  # P RW US: the PTE decides
            pde = t * PAGE | 7
        if self.pae:
            return (pde & ~0xFFF) + (vpn & 511) * 8
        return (pde & ~0xFFF) + (vpn & 0x3FF) * 4

    def _set_pte(self, vpn: int, value: int) -> None:
        a = self._pte_addr(vpn, True)
        assert a is not None
        if self.pae:
            self.mem.write_u64(a, value)
        else:
            self.mem.write_u32(a, value & M32)
        self.cpu.tlb_flush(vpn)

    def _clear_pte(self, vpn: int) -> None:
        a = self._pte_addr(vpn, False)
        if a is not None:
            if self.pae:
                self.mem.write_u64(a, 0)
            else:
                self.mem.write_u32(a, 0)
            self.cpu.tlb_flush(vpn)

    def _kernel_setup(self) -> None:
        cpu = self.cpu
        for i in range(KERNEL_PAGES):
            f = self._frame()
            self.mem.write(f * PAGE, bytes(PAGE))
            self._set_pte((KERNEL >> 12) + i, f * PAGE | 3)  # supervisor RW
        stubs = bytearray(PAGE)
        for v in range(256):
            if v != TIMER_VEC:
                code = _stub_code(v)
                stubs[v * STUB_SIZE : v * STUB_SIZE + len(code)] = code
        self.kwrite(STUBS, bytes(stubs))
        self.kwrite(TIMER_STUB, _stub_code(TIMER_VEC))
        gdt = [0, _desc(0, 0xFFFFF, 0xC09A), _desc(0, 0xFFFFF, 0xC092),
               _desc(0, 0xFFFFF, 0xC0FA), _desc(0, 0xFFFFF, 0xC0F2), _desc(TSS, 0x67, 0x89)]  # fmt: skip
        gdt += [0] * 3  # TLS entries 6-8
        self.kwrite(GDT, b"".join(struct.pack("<Q", d) for d in gdt))
        idt = bytearray(256 * 8)
        for v in range(256):
            off = TIMER_STUB if v == TIMER_VEC else STUBS + v * STUB_SIZE
            dpl = 3 if v in (0x80, 3, 4) else 0
            gate = (off & 0xFFFF) | KCS << 16 | (0x8E | dpl << 5) << 40 | (off >> 16) << 48
            idt[v * 8 : v * 8 + 8] = struct.pack("<Q", gate)
        self.kwrite(IDT, bytes(idt))
        tss = bytearray(0x68)
        struct.pack_into("<II", tss, 4, KSTACK_TOP, KDS)
        struct.pack_into("<H", tss, 0x66, 0x68)  # no I/O bitmap
        self.kwrite(TSS, bytes(tss))
        cpu.gdt_base, cpu.gdt_limit = GDT, len(gdt) * 8 - 1
        cpu.idt_base, cpu.idt_limit = IDT, 256 * 8 - 1
        cpu.tr_sel, cpu.tr_base, cpu.tr_limit, cpu.tr_type = 0x28, TSS, 0x67, 0xB
        if self.pae:
            # PAE with NX (as Debian's 686-pae kernel runs user space): the PDPT in the
            # page directory's frame, its four directories in the next four frames.
            for i in range(4):
                self.mem.write_u64(self.pd * PAGE + 8 * i, (self.pd + 1 + i) * PAGE | 1)
            cpu.set_cr(4, 0x630)  # PSE PAE OSFXSR OSXMMEXCPT
            cpu.wrmsr(0xC0000080, 0x800)  # EFER.NXE
        else:
            cpu.set_cr(4, 0x610)  # PSE OSFXSR OSXMMEXCPT
        cpu.set_cr(3, self.pd * PAGE)
        cpu.set_cr(0, 0x80010033)  # PG WP NE ET MP PE
        cpu.set_seg_raw(1, UCS, 0, M32, 0xC0FB)
        for i in (0, 2, 3, 4, 5):
            cpu.set_seg_raw(i, UDS, 0, M32, 0xC0F3)
        cpu.cpl = 3
        cpu.tlb_switch()
        cpu.intr = False
        cpu.irq_check = self._irq_check
        self._tick_pending = False

    def _irq_check(self) -> int | None:
        if self._tick_pending:
            self._tick_pending = False
            self.cpu.intr = False
            return TIMER_VEC
        self.cpu.intr = False
        return None

    def kwrite(self, lin: int, data: bytes) -> None:
        """Write kernel memory (mapped, supervisor pages)."""
        pos = 0
        while pos < len(data):
            a = lin + pos
            pa = self._phys_of(a)
            n = min(len(data) - pos, PAGE - (a & 0xFFF))
            self.mem.write(pa, data[pos : pos + n])
            pos += n

    def _phys_of(self, lin: int) -> int:
        a = self._pte_addr(lin >> 12, False)
        pte = (self.mem.read_u64(a) if self.pae else self.mem.read_u32(a)) if a is not None else 0
        pte &= 0xFFFFFFFFF
        if not pte & 1:
            raise KeyError(hex(lin))
        return (pte & ~0xFFF) | (lin & 0xFFF)

    # ------------------------------------------------------------------ mappings
    def map_range(self, start: int, length: int, prot: int, src: bytes | None = None,
                  off: int = 0, valid: int = 0) -> None:  # fmt: skip
        """Map [start, start+length) (page-aligned start); contents from src[off:] for
        `valid` bytes, zeros after."""
        npages = (length + PAGE - 1) // PAGE
        for i in range(npages):
            vpn = (start >> 12) + i
            self._unmap_page(vpn)
            pv = max(0, min(PAGE, valid - i * PAGE)) if src is not None else 0
            self.pages[vpn] = Page(prot, src if pv else None, off + i * PAGE, pv)

    def _unmap_page(self, vpn: int) -> None:
        if self.pages.pop(vpn, None) is not None:
            self._clear_pte(vpn)

    def _populate(self, vpn: int, write: bool) -> Page:
        pg = self.pages[vpn]
        if pg.frame is None:
            f = self._frame()
            data = bytearray(PAGE)
            if pg.src is not None:
                chunk = pg.src[pg.off : pg.off + pg.valid]
                data[: len(chunk)] = chunk
            self.mem.write(f * PAGE, bytes(data))
            pg.frame = f
        # Linux maps a private writable page read-only on a read fault and copies it
        # on the first write: do the same, so that writes fault after reads.
        if write and pg.prot & PROT_WRITE:
            pg.writable_now = True
        self._write_pte(vpn, pg)
        return pg

    def _write_pte(self, vpn: int, pg: Page) -> None:
        if pg.frame is None or not pg.prot & (PROT_READ | PROT_WRITE | PROT_EXEC):
            self._clear_pte(vpn)
            return
        rw = 2 if (pg.writable_now and pg.prot & PROT_WRITE) else 0
        nx = 1 << 63 if self.pae and not pg.prot & PROT_EXEC else 0
        self._set_pte(vpn, pg.frame * PAGE | 5 | rw | nx)

    def uread(self, lin: int, n: int) -> bytes:
        """copy_from_user: faults pages in; EFAULT for unmapped memory."""
        out = bytearray()
        while n > 0:
            vpn = lin >> 12
            if vpn not in self.pages:
                raise _Efault()
            pg = self._populate(vpn, False)
            k = min(n, PAGE - (lin & 0xFFF))
            assert pg.frame is not None
            out += self.mem.read(pg.frame * PAGE + (lin & 0xFFF), k)
            lin += k
            n -= k
        return bytes(out)

    def uwrite(self, lin: int, data: bytes) -> None:
        pos = 0
        while pos < len(data):
            a = lin + pos
            vpn = a >> 12
            if vpn not in self.pages or not self.pages[vpn].prot & PROT_WRITE:
                raise _Efault()
            pg = self._populate(vpn, True)
            k = min(len(data) - pos, PAGE - (a & 0xFFF))
            assert pg.frame is not None
            self.mem.write(pg.frame * PAGE + (a & 0xFFF), data[pos : pos + k])
            pos += k

    def ustr(self, lin: int, limit: int = 4096) -> str:
        out = bytearray()
        while len(out) < limit:
            chunk = self.uread(lin + len(out), min(64, PAGE - ((lin + len(out)) & 0xFFF)))
            i = chunk.find(0)
            if i >= 0:
                out += chunk[:i]
                return out.decode("utf-8", "surrogateescape")
            out += chunk
        raise _Efault()

    def _free_range(self, length: int) -> int:
        n = (length + PAGE - 1) // PAGE
        top = self.mmap_hint >> 12
        while True:
            lo = top - n
            if lo <= (self.brk >> 12) + 256:
                raise _Errno(errno.ENOMEM)
            clash = [v for v in range(lo, top) if v in self.pages]
            if not clash:
                return lo << 12
            top = min(clash)

    # ------------------------------------------------------------------ ELF loading
    def _load_elf(self, data: bytes, bias_for_dyn: int) -> tuple[int, int, int, int]:
        """Maps PT_LOAD segments; returns (load bias, entry, phdr address, end)."""
        if data[:4] != b"\x7fELF" or data[4] != 1:
            raise ValueError("not an ELF32 file")
        e_type, _m, _v, entry, phoff, _sh, _fl, _eh, phentsize, phnum = struct.unpack_from(
            "<HHIIIIIHHH", data, 16
        )
        phdrs = [struct.unpack_from("<8I", data, phoff + i * phentsize) for i in range(phnum)]
        loads = [p for p in phdrs if p[0] == 1]
        lo = min(p[2] for p in loads) & ~0xFFF
        hi = max(p[2] + p[5] for p in loads)
        bias = 0
        if e_type == 3:  # ET_DYN
            bias = bias_for_dyn if bias_for_dyn else self._free_range(hi - lo) - lo
        phdr_addr = 0
        for _t, off, vaddr, _pa, filesz, memsz, flags, _al in loads:
            start = (vaddr + bias) & ~0xFFF
            skip = (vaddr + bias) & 0xFFF
            prot = (PROT_READ if flags & 4 else 0) | (PROT_WRITE if flags & 2 else 0) | (
                PROT_EXEC if flags & 1 else 0)  # fmt: skip
            self.map_range(start, memsz + skip, prot, data, off - skip, filesz + skip)
            if off <= phoff < off + filesz:
                phdr_addr = vaddr + bias + (phoff - off)
        return bias, entry + bias, phdr_addr, hi + bias

    def execute(self, argv: list[str], env: list[str], max_instructions: int = 10**11,
                slice_instructions: int = 200_000) -> Result:  # fmt: skip
        path = self.host_path(argv[0])
        self.exe = argv[0]
        data = path.read_bytes()
        e_type = struct.unpack_from("<H", data, 16)[0]
        _e, _m, _v, _entry, phoff, _sh, _fl, _eh, phentsize, phnum = struct.unpack_from(
            "<HHIIIIIHHH", data, 16
        )
        interp = None
        for i in range(phnum):
            p = struct.unpack_from("<8I", data, phoff + i * phentsize)
            if p[0] == 3:
                interp = data[p[1] : p[1] + p[4]].rstrip(b"\0").decode()
        bias, entry, phdr, end = self._load_elf(data, PIE_BASE if e_type == 3 else 0)
        self.brk_start = self.brk = (end + PAGE - 1) & ~0xFFF
        base = 0
        start = entry
        if interp is not None:
            idata = self.host_path(interp).read_bytes()
            base, start, _ph, _end = self._load_elf(idata, 0)
            self.mmap_hint = base
        else:
            self.mmap_hint = min(self.mmap_hint, MMAP_BASE)
        sp = self._initial_stack(argv, env, phdr, phnum, entry, base)
        cpu = self.cpu
        cpu.eip = start
        cpu.r[:] = [0, 0, 0, 0, sp, 0, 0, 0]
        cpu.set_flags(0x202, 0x3F7FD5)
        cpu.fpu.finit()  # a new process's FPU state: FCW 0x37F, MXCSR 0x1F80 (fpstate_init)
        return self._run(max_instructions, slice_instructions)

    def _initial_stack(self, argv: list[str], env: list[str], phdr: int, phnum: int,
                       entry: int, base: int) -> int:  # fmt: skip
        lo = STACK_TOP - STACK_PAGES * PAGE
        self.map_range(lo, STACK_PAGES * PAGE, PROT_READ | PROT_WRITE)
        sp = STACK_TOP - 16
        blob = bytearray()

        def put(b: bytes) -> int:
            blob[:0] = b
            return len(blob)

        marks = [put(s.encode() + b"\0") for s in [*argv, *env, "i686"]]
        rnd_mark = put(bytes(self.rng.getrandbits(8) for _ in range(16)))
        strs_at = (sp - len(blob)) & ~0xF

        def addr(mark: int) -> int:
            return strs_at + len(blob) - mark

        self.uwrite(strs_at, bytes(blob))
        # The feature bits of CPUID leaf 1, as the kernel's AT_HWCAP.
        from boite.accel.emu.cpumodel import cpuid_leaf

        hwcap = cpuid_leaf(self.cpu.features, 1)[3]
        aux = [(3, phdr), (4, 32), (5, phnum), (6, PAGE), (7, base), (8, 0), (9, entry),
               (11, 0), (12, 0), (13, 0), (14, 0), (16, hwcap), (17, 100), (23, 0),
               (25, addr(rnd_mark)), (15, addr(marks[-1])), (31, addr(marks[0])), (0, 0)]  # fmt: skip
        words = [len(argv)] + [addr(m) for m in marks[: len(argv)]] + [0]
        words += [addr(m) for m in marks[len(argv) : len(argv) + len(env)]] + [0]
        for k, v in aux:
            words += [k, v]
        sp = (strs_at - 4 * len(words)) & ~0xF
        self.uwrite(sp, struct.pack(f"<{len(words)}I", *words))
        return sp

    # ------------------------------------------------------------------ running
    def _run(self, max_instructions: int, slice_instructions: int) -> Result:
        cpu = self.cpu
        done = 0
        next_tick = self.timer_every or 0
        try:
            while done < max_instructions:
                n = slice_instructions
                if self.timer_every:
                    n = min(n, max(1, next_tick - done))
                done += cpu.run(n)
                if self.timer_every and done >= next_tick:
                    next_tick = done + self.timer_every
                    self._tick_pending = True
                    cpu.intr = True
                if cpu.halted:
                    cpu.halted = False
                    self._kernel_entry()
        except UserExit:
            pass
        return Result(self.status, self.signal, bytes(self.stdout), bytes(self.stderr),
                      cpu.icount, self.syscalls, self.unknown, self.fault)  # fmt: skip

    def _kernel_entry(self) -> None:
        cpu = self.cpu
        at = cpu.eip - 1 - STUBS
        vec = at // STUB_SIZE
        if not 0 <= at < PAGE or at % STUB_SIZE:
            raise RuntimeError(f"HLT outside the stubs at {cpu.eip:#x}")
        esp = cpu.r[4]
        err = None
        if vec in ERRCODE_VECS:
            err = struct.unpack("<I", self._kread(esp, 4))[0]
            esp += 4
        eip, cs = struct.unpack("<II", self._kread(esp, 8))
        if vec == 0x80:
            self._syscall()
            return
        if vec == 14 and cs & 3 == 3 and self._page_fault(cpu.cr2, err or 0):
            key = (eip, cpu.cr2, err)
            if key == self._last_fault:
                self._fault_repeats += 1
                if self._fault_repeats > 16:  # the "kernel" did not resolve it
                    self.signal = 11
                    self.fault = f"page fault loop at eip {eip:#x} cr2 {cpu.cr2:#x} error {err}"
                    raise UserExit()
            else:
                self._last_fault, self._fault_repeats = key, 0
            return
        self.signal = 11 if vec in (13, 14) else 4 if vec == 6 else 8 if vec == 0 else 7
        self.fault = f"vector {vec} error {err} at eip {eip:#x} cr2 {cpu.cr2:#x}"
        raise UserExit()

    def _kread(self, lin: int, n: int) -> bytes:
        return self.mem.read(self._phys_of(lin), n)

    def _page_fault(self, addr: int, err: int) -> bool:
        vpn = addr >> 12
        pg = self.pages.get(vpn)
        if pg is None:
            return False
        write = bool(err & 2)
        if write and not pg.prot & PROT_WRITE:
            return False
        if not write and not pg.prot & (PROT_READ | PROT_EXEC):
            return False
        if err & 1 and not write:
            return False  # a present page refused a read: protection
        self._populate(vpn, write)
        return True

    # ------------------------------------------------------------------ files
    def host_path(self, path: str, dirfd: int = AT_FDCWD) -> Path:
        p = PurePosixPath(path)
        if not p.is_absolute():
            if dirfd != AT_FDCWD:
                of = self.fds.get(dirfd)
                if not isinstance(of, OpenFile):
                    raise _Errno(errno.EBADF)
                base = PurePosixPath("/") / of.path.relative_to(self.root)
            else:
                base = PurePosixPath(self.cwd)
            p = base / p
        parts: list[str] = []
        for part in p.parts[1:]:
            if part == "..":
                if parts:
                    parts.pop()
            elif part not in (".", ""):
                parts.append(part)
        # Resolve symbolic links inside the root, component by component.
        cur = self.root
        for i, part in enumerate(parts):
            nxt = cur / part
            if nxt.is_symlink():
                target = os.readlink(nxt)
                rest = "/".join(parts[i + 1 :])
                rel = target if target.startswith("/") else str(
                    PurePosixPath("/") / cur.relative_to(self.root) / target)  # fmt: skip
                return self.host_path(rel + ("/" + rest if rest else ""))
            cur = nxt
        return cur

    def _fd(self) -> int:
        n = 0
        while n in self.fds:
            n += 1
        return n

    def _stat_of(self, p: Path, follow: bool = True) -> os.stat_result:
        try:
            return p.stat() if follow else p.lstat()
        except FileNotFoundError:
            raise _Errno(errno.ENOENT) from None
        except NotADirectoryError:
            raise _Errno(errno.ENOTDIR) from None

    def _fd_stat(self, fd: int) -> os.stat_result | str:
        of = self.fds.get(fd)
        if of is None:
            raise _Errno(errno.EBADF)
        if isinstance(of, str):
            return of
        if of.dirty and of.data is not None:
            of.path.write_bytes(bytes(of.data))
            of.dirty = False
        return self._stat_of(of.path)

    @staticmethod
    def _stat64(st: os.stat_result | str) -> bytes:
        if isinstance(st, str):  # a terminal-less pipe
            return struct.pack("<Q4xIIIIIQ4xqIQIIIIIIQ", 0xE, 5, 0o10600, 1, 0, 0, 0, 0,
                               4096, 0, 0, 0, 0, 0, 0, 0, 5)  # fmt: skip
        t = 1_700_000_000
        return struct.pack("<Q4xIIIIIQ4xqIQIIIIIIQ", 0x801, st.st_ino & M32, st.st_mode,
                           st.st_nlink, 0, 0, 0, st.st_size, 4096, (st.st_size + 511) // 512,
                           t, 0, t, 0, t, 0, st.st_ino)  # fmt: skip

    @staticmethod
    def _statx(st: os.stat_result | str) -> bytes:
        b = bytearray(256)
        if isinstance(st, str):
            mode, ino, size, nlink = 0o10600, 5, 0, 1
        else:
            mode, ino, size, nlink = st.st_mode, st.st_ino, st.st_size, st.st_nlink
        struct.pack_into("<IIQIIIHxxQQQQ", b, 0, 0x7FF, 4096, 0, nlink, 0, 0, mode, ino,
                         size, (size + 511) // 512, 0)  # fmt: skip
        for off in (0x40, 0x50, 0x60, 0x70):
            struct.pack_into("<qI", b, off, 1_700_000_000, 0)
        struct.pack_into("<IIII", b, 0x80, 0, 0, 8, 1)
        return bytes(b)

    # ------------------------------------------------------------------ system calls
    def _syscall(self) -> None:
        cpu = self.cpu
        nr = cpu.r[0]
        a = [cpu.r[3], cpu.r[1], cpu.r[2], cpu.r[6], cpu.r[7], cpu.r[5]]
        handler = _SYSCALLS.get(nr)
        try:
            if handler is None:
                self.unknown.add(nr)
                raise _Errno(errno.ENOSYS)
            res = handler(self, *a)
        except _Errno as e:
            res = -e.code
        except _Efault:
            res = -errno.EFAULT
        if self.trace:
            print(f"syscall {nr}({', '.join(hex(x) for x in a[:4])}) = {res:#x}"
                  if res >= 0 else f"syscall {nr}({', '.join(hex(x) for x in a[:4])}) = {res}")  # fmt: skip
        self.syscalls.append((nr, res))
        cpu.r[0] = res & M32

    def sys_exit_group(self, status: int, *_: int) -> int:
        self.status = status & 0xFF
        raise UserExit()

    def sys_write(self, fd: int, buf: int, n: int, *_: int) -> int:
        data = self.uread(buf, n)
        of = self.fds.get(fd)
        if of == "stdout":
            self.stdout += data
        elif of == "stderr":
            self.stderr += data
        elif isinstance(of, OpenFile) and of.data is not None:
            if of.flags & O_APPEND:
                of.pos = len(of.data)
            of.data[of.pos : of.pos + len(data)] = data
            of.pos += len(data)
            of.dirty = True
        else:
            raise _Errno(errno.EBADF)
        return len(data)

    def sys_writev(self, fd: int, iov: int, cnt: int, *_: int) -> int:
        total = 0
        for i in range(cnt):
            base, ln = struct.unpack("<II", self.uread(iov + 8 * i, 8))
            total += self.sys_write(fd, base, ln)
        return total

    def sys_read(self, fd: int, buf: int, n: int, *_: int) -> int:
        of = self.fds.get(fd)
        if of == "stdin":
            return 0
        if not isinstance(of, OpenFile):
            raise _Errno(errno.EBADF)
        if of.data is None:
            raise _Errno(errno.EISDIR)
        data = bytes(of.data[of.pos : of.pos + n])
        self.uwrite(buf, data)
        of.pos += len(data)
        return len(data)

    def sys_pread64(self, fd: int, buf: int, n: int, lo: int, hi: int, *_: int) -> int:
        of = self.fds.get(fd)
        if not isinstance(of, OpenFile) or of.data is None:
            raise _Errno(errno.EBADF)
        off = lo | hi << 32
        data = bytes(of.data[off : off + n])
        self.uwrite(buf, data)
        return len(data)

    def sys_open(self, path: int, flags: int, mode: int, *_: int) -> int:
        return self.sys_openat(AT_FDCWD, path, flags, mode)

    def sys_openat(self, dirfd: int, path: int, flags: int, mode: int, *_: int) -> int:
        p = self.host_path(self.ustr(path), dirfd)
        exists = p.exists()
        if flags & O_CREAT:
            if exists and flags & O_EXCL:
                raise _Errno(errno.EEXIST)
            if not exists:
                if not p.parent.is_dir():
                    raise _Errno(errno.ENOENT)
                p.write_bytes(b"")
                p.chmod(mode & 0o777)
        elif not exists:
            raise _Errno(errno.ENOENT)
        if p.is_dir():
            if flags & O_ACCMODE:
                raise _Errno(errno.EISDIR)
            ents = [(".", 1, 4), ("..", 2, 4)] + [
                (e.name, e.inode() & M32, 4 if e.is_dir(follow_symlinks=False) else
                 10 if e.is_symlink() else 8) for e in sorted(os.scandir(p), key=lambda e: e.name)]  # fmt: skip
            of = OpenFile(p, None, 0, flags, ents)
        else:
            if flags & O_DIRECTORY:
                raise _Errno(errno.ENOTDIR)
            data = bytearray() if flags & O_TRUNC else bytearray(p.read_bytes())
            of = OpenFile(p, data, 0, flags, dirty=bool(flags & O_TRUNC))
        fd = self._fd()
        self.fds[fd] = of
        return fd

    def sys_close(self, fd: int, *_: int) -> int:
        of = self.fds.pop(fd, None)
        if of is None:
            raise _Errno(errno.EBADF)
        if isinstance(of, OpenFile) and of.dirty and of.data is not None:
            of.path.write_bytes(bytes(of.data))
        return 0

    def sys_getdents64(self, fd: int, buf: int, n: int, *_: int) -> int:
        of = self.fds.get(fd)
        if not isinstance(of, OpenFile) or of.dirents is None:
            raise _Errno(errno.ENOTDIR)
        out = bytearray()
        while of.pos < len(of.dirents):
            name, ino, typ = of.dirents[of.pos]
            nb = name.encode()
            reclen = (19 + len(nb) + 1 + 7) & ~7
            if len(out) + reclen > n:
                if not out:
                    raise _Errno(errno.EINVAL)
                break
            rec = struct.pack("<QqHB", ino, of.pos + 1, reclen, typ) + nb
            out += rec + bytes(reclen - len(rec))
            of.pos += 1
        self.uwrite(buf, bytes(out))
        return len(out)

    def sys_llseek(self, fd: int, hi: int, lo: int, result: int, whence: int, *_: int) -> int:
        of = self.fds.get(fd)
        if not isinstance(of, OpenFile):
            raise _Errno(errno.ESPIPE)
        off = struct.unpack("<q", struct.pack("<Q", lo | hi << 32))[0]
        size = len(of.data) if of.data is not None else 0
        new = [off, of.pos + off, size + off][whence]
        if new < 0:
            raise _Errno(errno.EINVAL)
        of.pos = new
        self.uwrite(result, struct.pack("<q", new))
        return 0

    def sys_lseek(self, fd: int, off: int, whence: int, *_: int) -> int:
        of = self.fds.get(fd)
        if not isinstance(of, OpenFile):
            raise _Errno(errno.ESPIPE)
        off = off - (1 << 32) if off & 0x80000000 else off
        size = len(of.data) if of.data is not None else 0
        of.pos = [off, of.pos + off, size + off][whence]
        return of.pos

    def sys_stat64(self, path: int, buf: int, *_: int) -> int:
        self.uwrite(buf, self._stat64(self._stat_of(self.host_path(self.ustr(path)))))
        return 0

    def sys_lstat64(self, path: int, buf: int, *_: int) -> int:
        p = self.host_path(self.ustr(path))
        self.uwrite(buf, self._stat64(self._stat_of(p, follow=False)))
        return 0

    def sys_fstat64(self, fd: int, buf: int, *_: int) -> int:
        self.uwrite(buf, self._stat64(self._fd_stat(fd)))
        return 0

    def sys_fstatat64(self, dirfd: int, path: int, buf: int, flags: int, *_: int) -> int:
        s = self.ustr(path)
        if not s and flags & 0x1000:  # AT_EMPTY_PATH
            st = self._fd_stat(dirfd)
        else:
            st = self._stat_of(self.host_path(s, dirfd), not flags & 0x100)
        self.uwrite(buf, self._stat64(st))
        return 0

    def sys_statx(self, dirfd: int, path: int, flags: int, _mask: int, buf: int, *_: int) -> int:
        s = self.ustr(path)
        if not s and flags & 0x1000:
            st = self._fd_stat(dirfd)
        else:
            st = self._stat_of(self.host_path(s, dirfd), not flags & 0x100)
        self.uwrite(buf, self._statx(st))
        return 0

    def sys_access(self, path: int, mode: int, *_: int) -> int:
        self._stat_of(self.host_path(self.ustr(path)))
        return 0

    def sys_faccessat(self, dirfd: int, path: int, mode: int, *_: int) -> int:
        self._stat_of(self.host_path(self.ustr(path), dirfd))
        return 0

    def sys_readlink(self, path: int, buf: int, n: int, *_: int) -> int:
        s = self.ustr(path)
        if s == "/proc/self/exe":
            target = self.exe.encode()
        else:
            p = self.host_path(str(PurePosixPath(s).parent)) / PurePosixPath(s).name
            if not p.is_symlink():
                raise _Errno(errno.EINVAL if p.exists() else errno.ENOENT)
            target = os.readlink(p).encode()
        self.uwrite(buf, target[:n])
        return min(n, len(target))

    def sys_mkdir(self, path: int, mode: int, *_: int) -> int:
        p = self.host_path(self.ustr(path))
        if p.exists():
            raise _Errno(errno.EEXIST)
        p.mkdir(mode & 0o777)
        return 0

    def sys_unlink(self, path: int, *_: int) -> int:
        p = self.host_path(self.ustr(path))
        if not p.exists():
            raise _Errno(errno.ENOENT)
        p.unlink()
        return 0

    def sys_rename(self, old: int, new: int, *_: int) -> int:
        src = self.host_path(self.ustr(old))
        if not src.exists():
            raise _Errno(errno.ENOENT)
        src.replace(self.host_path(self.ustr(new)))
        return 0

    def sys_fchmod(self, fd: int, mode: int, *_: int) -> int:
        return 0

    def sys_getcwd(self, buf: int, n: int, *_: int) -> int:
        b = self.cwd.encode() + b"\0"
        if len(b) > n:
            raise _Errno(errno.ERANGE)
        self.uwrite(buf, b)
        return len(b)

    def sys_ioctl(self, fd: int, req: int, *_: int) -> int:
        if fd not in self.fds:
            raise _Errno(errno.EBADF)
        raise _Errno(errno.ENOTTY)

    def sys_fcntl64(self, fd: int, cmd: int, arg: int, *_: int) -> int:
        if fd not in self.fds:
            raise _Errno(errno.EBADF)
        if cmd == 0 or cmd == 1030:  # F_DUPFD, F_DUPFD_CLOEXEC
            n = arg
            while n in self.fds:
                n += 1
            self.fds[n] = self.fds[fd]
            return n
        if cmd == 3:  # F_GETFL
            of = self.fds[fd]
            return of.flags if isinstance(of, OpenFile) else (0 if of == "stdin" else 1)
        return 0

    def sys_dup(self, fd: int, *_: int) -> int:
        if fd not in self.fds:
            raise _Errno(errno.EBADF)
        n = self._fd()
        self.fds[n] = self.fds[fd]
        return n

    # memory
    def sys_brk(self, new: int, *_: int) -> int:
        if new < self.brk_start:
            return self.brk
        old_top = (self.brk + PAGE - 1) & ~0xFFF
        new_top = (new + PAGE - 1) & ~0xFFF
        if new_top > old_top:
            if any(v in self.pages for v in range(old_top >> 12, new_top >> 12)):
                return self.brk
            self.map_range(old_top, new_top - old_top, PROT_READ | PROT_WRITE)
        else:
            for v in range(new_top >> 12, old_top >> 12):
                self._unmap_page(v)
        self.brk = new
        return new

    def sys_mmap2(self, addr: int, length: int, prot: int, flags: int, fd: int,
                  pgoff: int) -> int:  # fmt: skip
        if length == 0:
            raise _Errno(errno.EINVAL)
        length = (length + PAGE - 1) & ~0xFFF
        if flags & (MAP_FIXED | MAP_FIXED_NOREPLACE):
            if addr & 0xFFF:
                raise _Errno(errno.EINVAL)
            start = addr
        else:
            start = self._free_range(length)
            self.mmap_hint = start
        src = None
        valid = 0
        off = pgoff * PAGE
        if not flags & MAP_ANONYMOUS:
            of = self.fds.get(fd)
            if not isinstance(of, OpenFile) or of.data is None:
                raise _Errno(errno.EBADF)
            src = bytes(of.data)
            valid = max(0, min(length, len(src) - off))
        self.map_range(start, length, prot, src, off, valid)
        return start

    def sys_mmap_old(self, args: int, *_: int) -> int:
        a = struct.unpack("<6I", self.uread(args, 24))
        return self.sys_mmap2(a[0], a[1], a[2], a[3], a[4], a[5] // PAGE)

    def sys_munmap(self, addr: int, length: int, *_: int) -> int:
        for v in range(addr >> 12, (addr + length + PAGE - 1) >> 12):
            self._unmap_page(v)
        return 0

    def sys_mprotect(self, addr: int, length: int, prot: int, *_: int) -> int:
        for v in range(addr >> 12, (addr + length + PAGE - 1) >> 12):
            pg = self.pages.get(v)
            if pg is None:
                raise _Errno(errno.ENOMEM)
            pg.prot = prot
            self._write_pte(v, pg)
        return 0

    def sys_mremap(self, *_: int) -> int:
        raise _Errno(errno.ENOMEM)  # glibc falls back to malloc + copy

    def sys_madvise(self, *_: int) -> int:
        return 0

    # process
    def sys_set_thread_area(self, uinfo: int, *_: int) -> int:
        entry, base, limit, flags = struct.unpack("<iIII", self.uread(uinfo, 16))
        if entry == -1:
            entry = TLS_FIRST
            self.uwrite(uinfo, struct.pack("<i", entry))
        if not TLS_FIRST <= entry < TLS_FIRST + 3:
            raise _Errno(errno.EINVAL)
        attr = 0xF2 | (0x4000 if flags & 1 else 0) | (0x8000 if flags & 0x10 else 0)
        self.kwrite(GDT + entry * 8, struct.pack("<Q", _desc(base, limit, attr)))
        return 0

    def sys_set_tid_address(self, *_: int) -> int:
        return 1000

    def sys_getpid(self, *_: int) -> int:
        return 1000

    def sys_getuid(self, *_: int) -> int:
        return 0

    def sys_zero(self, *_: int) -> int:
        return 0

    def sys_uname(self, buf: int, *_: int) -> int:
        fields = ["Linux", "boite", "6.1.0-usermode", "#1", "i686", "(none)"]
        self.uwrite(buf, b"".join(f.encode().ljust(65, b"\0") for f in fields))
        return 0

    def sys_rt_sigaction(self, sig: int, act: int, old: int, *_: int) -> int:
        if old:
            self.uwrite(old, bytes(20))
        return 0

    def sys_rt_sigprocmask(self, how: int, new: int, old: int, *_: int) -> int:
        if old:
            self.uwrite(old, bytes(8))
        return 0

    def sys_getrandom(self, buf: int, n: int, *_: int) -> int:
        self.uwrite(buf, bytes(self.rng.getrandbits(8) for _ in range(n)))
        return n

    def _now(self) -> int:
        self.clock_ns += 1_000_000
        return self.clock_ns

    def sys_clock_gettime(self, clk: int, ts: int, *_: int) -> int:
        t = self._now()
        self.uwrite(ts, struct.pack("<II", t // 10**9 & M32, t % 10**9))
        return 0

    def sys_clock_gettime64(self, clk: int, ts: int, *_: int) -> int:
        t = self._now()
        self.uwrite(ts, struct.pack("<qq", t // 10**9, t % 10**9))
        return 0

    def sys_gettimeofday(self, tv: int, *_: int) -> int:
        t = self._now()
        if tv:
            self.uwrite(tv, struct.pack("<II", t // 10**9 & M32, t % 10**9 // 1000))
        return 0

    def sys_prlimit64(self, pid: int, res: int, new: int, old: int, *_: int) -> int:
        if old:
            lim = 8 << 20 if res == 3 else (1024 if res == 7 else (1 << 64) - 1)
            self.uwrite(old, struct.pack("<QQ", lim, (1 << 64) - 1 if res != 7 else 4096))
        return 0

    def sys_ugetrlimit(self, res: int, buf: int, *_: int) -> int:
        lim = 8 << 20 if res == 3 else (1024 if res == 7 else M32)
        self.uwrite(buf, struct.pack("<II", lim, M32))
        return 0

    def sys_sysinfo(self, buf: int, *_: int) -> int:
        b = bytearray(64)
        struct.pack_into("<iIIIIIIIHHIII", b, 0, 100, 0, 0, 0, 256 << 20, 128 << 20, 0, 0,
                         0, 1, 0, 0, 1)  # fmt: skip
        self.uwrite(buf, bytes(b))
        return 0

    def sys_sched_getaffinity(self, pid: int, n: int, mask: int, *_: int) -> int:
        self.uwrite(mask, b"\x01" + bytes(3))
        return 4

    def sys_futex(self, *_: int) -> int:
        return 0


class _Errno(Exception):
    def __init__(self, code: int) -> None:
        self.code = code


class _Efault(Exception):
    pass


def _desc(base: int, limit: int, attr: int) -> int:
    """An 8-byte segment descriptor; attr = access byte | flags nibble << 12."""
    return (
        (limit & 0xFFFF)
        | (base & 0xFFFFFF) << 16
        | (attr & 0xFF) << 40
        | ((limit >> 16) & 0xF) << 48
        | ((attr >> 12) & 0xF) << 52
        | (base >> 24 & 0xFF) << 56
    )


# i386 system call numbers (arch/x86/entry/syscalls/syscall_32.tbl).
_SYSCALLS = {
    1: UserMode.sys_exit_group, 3: UserMode.sys_read, 4: UserMode.sys_write,
    5: UserMode.sys_open, 6: UserMode.sys_close, 10: UserMode.sys_unlink,
    19: UserMode.sys_lseek, 20: UserMode.sys_getpid, 33: UserMode.sys_access,
    38: UserMode.sys_rename, 39: UserMode.sys_mkdir, 41: UserMode.sys_dup,
    45: UserMode.sys_brk, 54: UserMode.sys_ioctl, 78: UserMode.sys_gettimeofday,
    85: UserMode.sys_readlink, 90: UserMode.sys_mmap_old, 91: UserMode.sys_munmap,
    94: UserMode.sys_fchmod, 116: UserMode.sys_sysinfo, 122: UserMode.sys_uname,
    125: UserMode.sys_mprotect, 140: UserMode.sys_llseek, 146: UserMode.sys_writev,
    163: UserMode.sys_mremap, 174: UserMode.sys_rt_sigaction,
    175: UserMode.sys_rt_sigprocmask, 180: UserMode.sys_pread64, 183: UserMode.sys_getcwd,
    186: UserMode.sys_zero, 191: UserMode.sys_ugetrlimit, 192: UserMode.sys_mmap2,
    195: UserMode.sys_stat64, 196: UserMode.sys_lstat64, 197: UserMode.sys_fstat64,
    199: UserMode.sys_getuid, 200: UserMode.sys_getuid, 201: UserMode.sys_getuid,
    202: UserMode.sys_getuid, 219: UserMode.sys_madvise, 220: UserMode.sys_getdents64,
    221: UserMode.sys_fcntl64, 224: UserMode.sys_getpid, 240: UserMode.sys_futex,
    242: UserMode.sys_sched_getaffinity, 243: UserMode.sys_set_thread_area,
    252: UserMode.sys_exit_group, 258: UserMode.sys_set_tid_address,
    265: UserMode.sys_clock_gettime, 295: UserMode.sys_openat, 300: UserMode.sys_fstatat64,
    307: UserMode.sys_faccessat, 311: UserMode.sys_zero, 340: UserMode.sys_prlimit64,
    355: UserMode.sys_getrandom, 383: UserMode.sys_statx, 403: UserMode.sys_clock_gettime64,
    439: UserMode.sys_faccessat,
}  # fmt: skip

__all__ = ["Result", "UserExit", "UserMode"]
