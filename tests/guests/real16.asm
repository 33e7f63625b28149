; Real mode: the test loads this at 0000:8000 with the vCPU in its reset mode.
; Prints a line computed in 16-bit code, then exits with status (0x11 << 1) | 1.
bits 16
org 0x8000
%include "com1.inc"

start:
    xor ax, ax
    mov ds, ax
    mov ss, ax
    mov sp, 0x7000
    mov si, hello
    call puts
    ; Show that segment arithmetic works: read the string's first byte through ES=0x800.
    mov ax, 0x0800
    mov es, ax
    mov al, [es:hello - 0x8000]
    call putc
    mov al, 10
    call putc
    EXIT_WITH 0x11

DEFINE_PUTC
DEFINE_PUTS

hello: db "real mode: hello from 16-bit code ", 0
