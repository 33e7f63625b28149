"""String instructions (MOVS/CMPS/STOS/LODS/SCAS/INS/OUTS, with REP page runs) and port I/O (IN/OUT)."""

from __future__ import annotations

from boite.accel.emu.arch import (
    DF,
    DS,
    ES,
    M16,
    M32,
    MASK,
)
from boite.accel.emu.decode.core import (
    Ctx,
    DecoderBase,
    Fn,
)

# Iterations of one REP string instruction before it yields (see string_rep); a page run
# of the fast paths counts as one.
REP_SLICE = 1 << 16


class StringOps(DecoderBase):
    def _string(self, x: Ctx, b: int) -> Fn:
        c = self.c
        r = c.r
        sb = c.sbase
        size = 1 if b in (0xA4, 0xA6, 0xAA, 0xAC, 0xAE, 0x6C, 0x6E) else (4 if x.op32 else 2)
        am = M32 if x.ad32 else M16
        src_seg = x.seg if x.seg is not None else DS
        rep = x.rep
        nxt = self.nxt(x)
        rd, wr = self.rdfn(size), self.wrfn(size)
        m = MASK[size]
        kind = b & 0xFE
        cmpf = self.alu_fn(7, size)

        def adv(reg: int, delta: int, r=r, am=am) -> None:
            r[reg] = (r[reg] & ~am & M32) | ((r[reg] + delta) & am)

        uses_src = kind in (0xA4, 0xA6, 0xAC, 0x6E)
        uses_dst = kind in (0xA4, 0xA6, 0xAA, 0xAE, 0x6C)
        dst_write = kind in (0xA4, 0xAA, 0x6C)
        # Segment checks: DS:(E)SI (or the override) for the source, ES:(E)DI (never
        # overridden) for the destination; both before anything is read or written.
        chk_src = uses_src and self.seg_checked(src_seg)
        chk_dst = uses_dst and self.seg_checked(ES)
        chk = chk_src or chk_dst
        src_lin = self.lin_fn(src_seg, size, False) if chk_src else None
        dst_lin = self.lin_fn(ES, size, dst_write) if chk_dst else None

        def one(
            chk=chk,
            size=size,
            kind=kind,
            src_lin=src_lin,
            dst_lin=dst_lin,
            rd=rd,
            wr=wr,
            adv=adv,
            c=c,
            am=am,
            m=m,
            r=r,
            sb=sb,
            src_seg=src_seg,
            cmpf=cmpf,
        ) -> bool:
            """One iteration; returns the REPE/REPNE condition value (ZF) for CMPS/SCAS."""
            if chk:
                if src_lin is not None:
                    src_lin(r[6] & am)
                if dst_lin is not None:
                    dst_lin(r[7] & am)
            step = -size if c.fl & DF else size
            if kind == 0xA4:  # MOVS
                v = rd((sb[src_seg] + (r[6] & am)) & M32)
                wr((sb[ES] + (r[7] & am)) & M32, v)
                adv(6, step)
                adv(7, step)
            elif kind == 0xAA:  # STOS
                wr((sb[ES] + (r[7] & am)) & M32, r[0] & m)
                adv(7, step)
            elif kind == 0xAC:  # LODS
                v = rd((sb[src_seg] + (r[6] & am)) & M32)
                if size == 4:
                    r[0] = v
                elif size == 2:
                    r[0] = (r[0] & 0xFFFF0000) | v
                else:
                    r[0] = (r[0] & 0xFFFFFF00) | v
                adv(6, step)
            elif kind == 0xA6:  # CMPS
                a = rd((sb[src_seg] + (r[6] & am)) & M32)
                v = rd((sb[ES] + (r[7] & am)) & M32)
                cmpf(a, v)
                adv(6, step)
                adv(7, step)
                return (a - v) & m == 0
            elif kind == 0xAE:  # SCAS
                v = rd((sb[ES] + (r[7] & am)) & M32)
                a = r[0] & m
                cmpf(a, v)
                adv(7, step)
                return (a - v) & m == 0
            elif kind == 0x6C:  # INS
                c.io_check(r[2] & 0xFFFF, size)
                a = (sb[ES] + (r[7] & am)) & M32
                c.check_writable(a, size)
                wr(a, c.port_in(r[2] & 0xFFFF, size))
                adv(7, step)
            else:  # OUTS
                c.io_check(r[2] & 0xFFFF, size)
                v = rd((sb[src_seg] + (r[6] & am)) & M32)
                c.port_out(r[2] & 0xFFFF, size, v)
                adv(6, step)
            return True

        if not rep:

            def string1(nxt=nxt, one=one, c=c) -> None:
                one()
                c.eip = nxt

            return string1

        cond_kind = kind in (0xA6, 0xAE)
        want = rep == 0xF3  # REPE: continue while equal
        # A REP instruction ends its block: after a yield (below) EIP stays on it, and
        # the block's next instructions must not run as if it had finished (nhot, Dec 7:
        # `rep cmpsb; inc eax; inc eax` skipped the rest of the REP).
        x.end = True

        if kind == 0xA4:
            fast = self._fast_movs(am, src_seg, size, chk_src, chk_dst)
        elif kind == 0xAA:
            fast = self._fast_stos(am, size, chk_dst)
        elif kind == 0x6C:
            fast = self._fast_ins(am, size, chk_dst)
        elif kind == 0x6E:
            fast = self._fast_outs(am, src_seg, size, chk_src)
        else:
            fast = None

        def string_rep(
            nxt=nxt, am=am, c=c, fast=fast, r=r, one=one, cond_kind=cond_kind, kind=kind, want=want
        ) -> None:
            use_fast = fast is not None and (kind == 0xA4 or not c.fl & DF)
            left = REP_SLICE
            while r[1] & am:
                left -= 1
                if left < 0:
                    # Interrupted, as a CPU may between iterations: EIP stays on the
                    # instruction, which goes on from ECX when it runs again, so a huge
                    # count cannot hold the vCPU (pause, stop, interrupts) for minutes.
                    return
                if use_fast:
                    # Whole page runs; the slow step below fills the TLB for the next one.
                    # False: the port's device moves one element per access only.
                    if fast() is False:
                        use_fast = False
                    if not r[1] & am:
                        break
                res = one()
                r[1] = (r[1] & ~am & M32) | ((r[1] - 1) & am)
                if cond_kind and res != want:
                    break
            c.eip = nxt

        return string_rep

    def _room(self, s: int, size: int, am: int, write: bool, chk: bool):
        """f(offset, backwards) -> how many `size`-byte elements from offset on, in the
        copy direction, stay inside segment s (and do not wrap a 16-bit offset), for the
        fast REP paths; 0 sends the element to the checked one-at-a-time step. None when
        neither bound applies."""
        if not chk and am == M32:
            return None
        c = self.c
        lo_l = c.slo
        hi_l = (c.swhi if write else c.srhi) if chk else None
        n = size - 1

        def room(
            o: int, back: bool, chk=chk, am=am, lo_l=lo_l, s=s, hi_l=hi_l, n=n, size=size
        ) -> int:
            lo = lo_l[s] if chk else 0
            hi = min(hi_l[s], am) if hi_l is not None else am
            if o < lo or o + n > hi:
                return 0
            return (o - lo) // size + 1 if back else (hi - n - o) // size + 1

        return room

    def _fast_movs(
        self, am: int, src_seg: int, size: int, chk_src: bool = False, chk_dst: bool = False
    ) -> Fn:
        """REP MOVS within RAM pages, either direction: runs of elements copied with one
        slice assignment each. A run never overlaps its own destination in the copy
        direction, so the result equals the element-by-element copy. Runs stop at segment
        limits; the element there takes the checked step (and its fault)."""
        c = self.c
        r = c.r
        sb = c.sbase
        src_room = self._room(src_seg, size, am, False, chk_src)
        dst_room = self._room(ES, size, am, True, chk_dst)

        def fast(
            c=c, size=size, am=am, r=r, src_room=src_room, dst_room=dst_room, sb=sb, src_seg=src_seg
        ) -> None:
            ram = c.ram
            back = bool(c.fl & DF)
            step = -size if back else size
            while r[1] & am:
                s = (sb[src_seg] + (r[6] & am)) & M32
                d = (sb[ES] + (r[7] & am)) & M32
                sp = c.rtlb.get(s >> 12)
                dp = c.wtlb.get(d >> 12)
                so, do = s & 0xFFF, d & 0xFFF
                if sp is None or dp is None or so + size > 0x1000 or do + size > 0x1000:
                    return
                if back:
                    n = min(r[1] & am, so // size + 1, do // size + 1)
                else:
                    n = min(r[1] & am, (0x1000 - so) // size, (0x1000 - do) // size)
                if src_room is not None:
                    n = min(n, src_room(r[6] & am, back))
                if dst_room is not None:
                    n = min(n, dst_room(r[7] & am, back))
                if n <= 0:
                    return
                so |= sp
                do |= dp
                gap = (do - so) if not back else (so - do)
                if 0 < gap < n * size:
                    n = gap // size  # the destination runs into the source: shorter runs
                    if n == 0:
                        return
                span = n * size
                if back:
                    ram[do - span + size : do + size] = ram[so - span + size : so + size]
                else:
                    ram[do : do + span] = ram[so : so + span]
                r[6] = (r[6] & ~am & M32) | ((r[6] + step * n) & am)
                r[7] = (r[7] & ~am & M32) | ((r[7] + step * n) & am)
                r[1] = (r[1] & ~am & M32) | ((r[1] - n) & am)

        return fast

    def _fast_stos(self, am: int, size: int, chk_dst: bool = False) -> Fn:
        """REP STOS forwards within RAM pages, a run per page (stopping at ES's limit)."""
        c = self.c
        r = c.r
        sb = c.sbase
        dst_room = self._room(ES, size, am, True, chk_dst)

        def fast(c=c, am=am, r=r, dst_room=dst_room, size=size, sb=sb) -> None:
            ram = c.ram
            while r[1] & am:
                d = (sb[ES] + (r[7] & am)) & M32
                dp = c.wtlb.get(d >> 12)
                if dp is None:
                    return
                n = min(r[1] & am, (0x1000 - (d & 0xFFF)) // size)
                if dst_room is not None:
                    n = min(n, dst_room(r[7] & am, False))
                if n <= 0:
                    return
                do = dp | (d & 0xFFF)
                ram[do : do + size * n] = (r[0] & MASK[size]).to_bytes(size, "little") * n
                r[7] = (r[7] & ~am & M32) | ((r[7] + size * n) & am)
                r[1] = (r[1] & ~am & M32) | ((r[1] - n) & am)

        return fast

    def _fast_ins(self, am: int, size: int, chk_dst: bool = False) -> Fn:
        """REP INS forwards into RAM pages: a run per page from the device's string read
        (`Bus.read_string`, e.g. an ATA data register handing over a sector at once).
        The device sees the same count of accesses as one at a time would give it, and
        no interrupt is taken inside a REP either way; the permission bitmap is checked
        before each run, a run stops at a page without a write TLB entry or ES's limit,
        where the checked one-element step (and its fault) takes over. Returns False
        when the port's device has no string read, so the caller stops trying."""
        c = self.c
        r = c.r
        sb = c.sbase
        dst_room = self._room(ES, size, am, True, chk_dst)

        def fast(am=am, c=c, r=r, dst_room=dst_room, size=size, sb=sb) -> bool:
            read_string = getattr(c.pio, "read_string", None)
            if read_string is None or c.bp_io:
                return False
            port = r[2] & 0xFFFF
            while r[1] & am:
                d = (sb[ES] + (r[7] & am)) & M32
                dp = c.wtlb.get(d >> 12)
                if dp is None:
                    return True
                n = min(r[1] & am, (0x1000 - (d & 0xFFF)) // size)
                if dst_room is not None:
                    n = min(n, dst_room(r[7] & am, False))
                if n <= 0:
                    return True
                c.io_check(port, size)
                data = read_string(port, size, n)
                if data is None:
                    return False
                do = dp | (d & 0xFFF)
                c.ram[do : do + size * n] = data
                r[7] = (r[7] & ~am & M32) | ((r[7] + size * n) & am)
                r[1] = (r[1] & ~am & M32) | ((r[1] - n) & am)
            return True

        return fast

    def _fast_outs(self, am: int, src_seg: int, size: int, chk_src: bool = False) -> Fn:
        """REP OUTS forwards from RAM pages, a run per page through the device's string
        write (`Bus.write_string`); the same rules as `_fast_ins`. A write that stops
        the machine (power-off, reset) ends the run: the bus sets `c.stop`."""
        c = self.c
        r = c.r
        sb = c.sbase
        src_room = self._room(src_seg, size, am, False, chk_src)

        def fast(am=am, c=c, r=r, src_room=src_room, size=size, sb=sb, src_seg=src_seg) -> bool:
            write_string = getattr(c.pio, "write_string", None)
            if write_string is None or c.bp_io:
                return False
            port = r[2] & 0xFFFF
            while r[1] & am:
                s = (sb[src_seg] + (r[6] & am)) & M32
                sp = c.rtlb.get(s >> 12)
                if sp is None:
                    return True
                n = min(r[1] & am, (0x1000 - (s & 0xFFF)) // size)
                if src_room is not None:
                    n = min(n, src_room(r[6] & am, False))
                if n <= 0:
                    return True
                c.io_check(port, size)
                so = sp | (s & 0xFFF)
                if not write_string(port, size, bytes(c.ram[so : so + size * n])):
                    return False
                r[6] = (r[6] & ~am & M32) | ((r[6] + size * n) & am)
                r[1] = (r[1] & ~am & M32) | ((r[1] - n) & am)
            return True

        return fast

    def _io(self, x: Ctx, b: int) -> Fn:
        c = self.c
        size = 1 if b in (0xE4, 0xE6, 0xEC, 0xEE) else (4 if x.op32 else 2)
        port = self.u8(x) if b < 0xE8 else -1
        nxt = self.nxt(x)
        out = b in (0xE6, 0xE7, 0xEE, 0xEF)
        g = self.reg_get(0, size)
        s = self.reg_set(0, size)
        r = c.r

        def io(out=out, nxt=nxt, port=port, size=size, c=c, s=s, r=r, g=g) -> None:
            p = port if port >= 0 else r[2] & 0xFFFF
            c.io_check(p, size)
            if out:
                c.port_out(p, size, g())
            else:
                s(c.port_in(p, size))
            c.eip = nxt

        return io
