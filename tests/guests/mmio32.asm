; An MMIO device: the test maps a register block at 0xd0000000 (inside the PCI hole, no
; RAM behind it). The guest writes a dword to the "value" register, reads back the
; device's answer from "result" (the device returns value * 3 + 1), writes it to "report",
; and exits with (0x23 << 1) | 1 when the answer is right or 0x7f otherwise.
bits 32
org 0x100000
%include "com1.inc"

%define DEV        0xd0000000
%define DEV_VALUE  DEV + 0x0
%define DEV_RESULT DEV + 0x4
%define DEV_REPORT DEV + 0x8
%define DEV_BYTE   DEV + 0x10

start:
    mov dword [DEV_VALUE], 0x12345
    mov eax, [DEV_RESULT]
    mov [DEV_REPORT], eax
    mov byte [DEV_BYTE], 0xab       ; a one-byte access
    cmp eax, 0x12345 * 3 + 1
    jne .bad
    mov esi, ok
    call puts
    EXIT_WITH 0x23
.bad:
    EXIT_WITH 0x7f

DEFINE_PUTC
DEFINE_PUTS

ok: db "mmio: device answered", 10, 0
