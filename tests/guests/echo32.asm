; UART input: read bytes from COM1 and echo each one until a newline, then exit with
; (0x22 << 1) | 1. Flat 32-bit, loaded at 1 MiB.
bits 32
org 0x100000
%include "com1.inc"

start:
    mov esi, prompt
    call puts
.loop:
    call getc
    call putc
    cmp al, 10
    jne .loop
    EXIT_WITH 0x22

DEFINE_PUTC
DEFINE_GETC
DEFINE_PUTS

prompt: db "echo> ", 0
