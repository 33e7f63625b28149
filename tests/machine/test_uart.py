"""16550A register behaviour, checked against the PC16550D datasheet."""

from __future__ import annotations

import os
import threading

import pytest

from boite.errors import ConfigError
from boite.machine.devices.uart import (
    ConsoleBackend,
    FileBackend,
    PipeBackend,
    SerialBackend,
    Uart16550,
)
from boite.machine.irq import IrqLine

THR, IER, IIR, FCR, LCR, MCR, LSR, MSR, SCR = 0, 1, 2, 2, 3, 4, 5, 6, 7


class Capture(SerialBackend):
    def __init__(self) -> None:
        self.out = bytearray()

    def write(self, data: bytes) -> None:
        self.out += data


def make() -> tuple[Uart16550, IrqLine, Capture]:
    levels: list[bool] = []
    line = IrqLine(4, lambda gsi, level: levels.append(level))
    cap = Capture()
    return Uart16550(line, cap), line, cap


def test_transmit_goes_to_backend_and_lsr_shows_empty():
    u, _, cap = make()
    for b in b"hi\n":
        u.bus_write(THR, 1, b)
    assert bytes(cap.out) == b"hi\n"
    assert u.bus_read(LSR, 1) & 0x60 == 0x60  # THRE | TEMT


def test_divisor_latch_access():
    u, _, cap = make()
    u.bus_write(LCR, 1, 0x83)  # DLAB, 8N1
    u.bus_write(0, 1, 0x01)
    u.bus_write(1, 1, 0x00)
    assert u.divisor == 1
    assert u.bus_read(0, 1) == 0x01 and u.bus_read(1, 1) == 0
    u.bus_write(LCR, 1, 0x03)
    u.bus_write(THR, 1, ord("x"))
    assert cap.out == b"x"  # with DLAB clear offset 0 is THR again
    assert u.bus_read(IER, 1) == 0


def test_iir_no_interrupt_and_fifo_bits():
    u, _, _ = make()
    assert u.bus_read(IIR, 1) == 0x01
    u.bus_write(FCR, 1, 0x07)
    assert u.bus_read(IIR, 1) == 0xC1


def test_thre_interrupt_raised_by_enable_and_cleared_by_iir_read():
    u, line, _ = make()
    u.bus_write(IER, 1, 0x02)
    assert line.level
    assert u.bus_read(IIR, 1) == 0x02
    assert not line.level  # reading IIR with THRE as source clears it
    assert u.bus_read(IIR, 1) == 0x01
    u.bus_write(THR, 1, 0x41)  # the byte leaves; THR empty again
    assert line.level and u.bus_read(IIR, 1) == 0x02


def test_receive_data_interrupt_and_rbr():
    u, line, _ = make()
    u.bus_write(IER, 1, 0x01)
    assert not line.level
    u.feed(b"A")
    assert line.level
    assert u.bus_read(LSR, 1) & 0x01
    assert u.bus_read(IIR, 1) == 0x04
    assert u.bus_read(THR, 1) == ord("A")
    assert not line.level
    assert not u.bus_read(LSR, 1) & 0x01


def test_iir_priority_line_status_over_data_over_thre_over_modem():
    u, _, _ = make()
    u.bus_write(IER, 1, 0x0F)
    u.bus_write(MCR, 1, 0x10)  # loopback: modem inputs follow MCR
    u.bus_write(MCR, 1, 0x13)  # DTR/RTS: DSR and CTS change -> modem status
    # THRE is pending (ETBEI enabled with empty THR); modem status too
    assert u.bus_read(IIR, 1) == 0x02  # THRE over modem status; read clears THRE
    assert u.bus_read(IIR, 1) == 0x00  # then modem status
    # overrun in non-FIFO mode: two bytes into the one-byte RBR
    u.bus_write(THR, 1, 1)
    u.bus_write(THR, 1, 2)
    assert u.bus_read(IIR, 1) == 0x06  # receiver line status is the highest
    lsr = u.bus_read(LSR, 1)
    assert lsr & 0x02  # OE, cleared by the read
    assert u.bus_read(IIR, 1) == 0x04  # data available next
    assert u.bus_read(THR, 1) == 2  # 16450 mode: the new character replaced the old
    assert u.bus_read(IIR, 1) == 0x02  # THRE from the last transmit
    msr = u.bus_read(MSR, 1)
    assert msr & 0xF0 == 0x30 and msr & 0x03 == 0x03  # CTS, DSR and their deltas
    assert u.bus_read(IIR, 1) == 0x01  # reading MSR cleared the deltas


def test_fifo_trigger_level_and_character_timeout():
    u, _, _ = make()
    u.bus_write(FCR, 1, 0x87)  # enable, clear, trigger 8
    u.bus_write(IER, 1, 0x01)
    u.feed(b"abc")
    assert u.bus_read(IIR, 1) == 0xCC  # below trigger: character timeout
    u.feed(b"defgh")
    assert u.bus_read(IIR, 1) == 0xC4  # 8 bytes: data available
    assert bytes(u.bus_read(THR, 1) for _ in range(8)) == b"abcdefgh"
    assert u.bus_read(IIR, 1) == 0xC1


def test_host_input_is_never_lost_beyond_the_fifo():
    u, _, _ = make()
    u.bus_write(FCR, 1, 0x01)
    data = bytes(range(200))
    u.feed(data)
    assert len(u.rx) == 16 and not u.bus_read(LSR, 1) & 0x02
    got = bytearray()
    while u.bus_read(LSR, 1) & 0x01:
        got.append(u.bus_read(THR, 1))
    assert bytes(got) == data


def test_fcr_clears_receive_fifo():
    u, _, _ = make()
    u.bus_write(FCR, 1, 0x01)
    u.feed(bytes(range(20)))  # 16 in the FIFO, 4 waiting on the host side
    u.bus_write(FCR, 1, 0x03)  # clear the receive FIFO: its 16 bytes are gone
    got = bytearray()
    while u.bus_read(LSR, 1) & 1:
        got.append(u.bus_read(THR, 1))
    assert bytes(got) == bytes(range(16, 20))


def test_loopback_echoes_without_transmitting_and_maps_modem_lines():
    u, _, cap = make()
    u.bus_write(MCR, 1, 0x10 | 0x08 | 0x04)  # loop, OUT2, OUT1
    u.bus_write(THR, 1, 0x55)
    assert cap.out == b""
    assert u.bus_read(THR, 1) == 0x55
    msr = u.bus_read(MSR, 1)
    assert msr & 0xF0 == 0xC0  # DCD (OUT2) and RI (OUT1)
    u.feed(b"ignored")  # the line is disconnected in loopback
    assert not u.bus_read(LSR, 1) & 1


def test_scratch_and_state_round_trip():
    u, line, _ = make()
    u.bus_write(SCR, 1, 0xA5)
    u.bus_write(FCR, 1, 0x41)
    u.bus_write(IER, 1, 0x01)
    u.feed(b"q")
    state = u.save_state()
    v = Uart16550(IrqLine(4), Capture())
    v.load_state(state)
    assert v.save_state() == state
    assert v.bus_read(SCR, 1) == 0xA5 and v.irq.level
    assert v.bus_read(THR, 1) == ord("q")
    u.reset()
    assert u.bus_read(SCR, 1) == 0 and not line.level


def test_feed_is_thread_safe():
    u, _, _ = make()
    u.bus_write(FCR, 1, 0x01)
    chunks = [bytes([i]) * 100 for i in range(8)]
    threads = [threading.Thread(target=u.feed, args=(c,)) for c in chunks]
    for t in threads:
        t.start()
    got = bytearray()
    while any(t.is_alive() for t in threads) or u.bus_read(LSR, 1) & 1:
        if u.bus_read(LSR, 1) & 1:
            got.append(u.bus_read(THR, 1))
    for t in threads:
        t.join()
    assert sorted(got) == sorted(b"".join(chunks))


def test_console_buffers_while_detached_and_replays_on_attach():
    con = ConsoleBackend(ring_size=8)
    u = Uart16550(IrqLine(4), con)
    for b in b"0123456789":
        u.bus_write(THR, 1, b)
    assert con.buffered() == b"23456789" and con.dropped == 2
    seen = bytearray()
    viewer = con.attach(seen.extend)
    u.bus_write(THR, 1, ord("!"))
    viewer.flush()  # live output reaches a viewer through its own thread
    assert bytes(seen) == b"23456789!"
    con.detach(viewer)
    u.bus_write(THR, 1, ord("?"))
    assert bytes(seen) == b"23456789!" and con.buffered() == b"?"
    con.send(b"k")
    assert u.bus_read(THR, 1) == ord("k")


def test_file_backend_appends(tmp_path):
    path = tmp_path / "serial.log"
    path.write_bytes(b"old\n")
    u = Uart16550(IrqLine(4), FileBackend(path))
    for b in b"new\n":
        u.bus_write(THR, 1, b)
    u.backend.close()
    assert path.read_bytes() == b"old\nnew\n"
    with pytest.raises(ConfigError, match="cannot open"):
        FileBackend(tmp_path / "missing" / "x.log")


def test_pipe_backend_in_and_out(tmp_path):
    base = tmp_path / "com1"
    os.mkfifo(f"{base}.in")
    os.mkfifo(f"{base}.out")
    backend = PipeBackend(base)
    u = Uart16550(IrqLine(4), backend)
    reader = os.open(f"{base}.out", os.O_RDONLY | os.O_NONBLOCK)
    for b in b"out!":
        u.bus_write(THR, 1, b)
    assert os.read(reader, 100) == b"out!"
    writer = os.open(f"{base}.in", os.O_WRONLY)
    os.write(writer, b"in")
    got = bytearray()
    for _ in range(2000):
        if u.bus_read(LSR, 1) & 1:
            got.append(u.bus_read(THR, 1))
        if len(got) == 2:
            break
        threading.Event().wait(0.005)
    assert bytes(got) == b"in"
    os.close(writer)
    os.close(reader)
    backend.close()


def test_pipe_backend_never_blocks_without_a_reader(tmp_path):
    backend = PipeBackend(tmp_path / "p", buffer_limit=1000)
    u = Uart16550(IrqLine(4), backend)
    for _ in range(70_000):  # beyond the kernel's 64 KiB pipe buffer
        u.bus_write(THR, 1, 0x2E)
    assert backend.dropped > 0
    backend.close()
    (tmp_path / "f").write_bytes(b"")
    with pytest.raises(ConfigError, match="not a named pipe"):
        PipeBackend(tmp_path / "f")
