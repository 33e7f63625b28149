; Halts with interrupts off: nothing can ever wake it.
bits 32
org 0x100000
%include "com1.inc"

start:
    mov al, 'z'
    call putc
    cli
    hlt
    jmp start

DEFINE_PUTC
