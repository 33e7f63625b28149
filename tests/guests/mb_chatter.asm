; Multiboot kernel that prints the same line on COM1 for ever: a console that never goes
; quiet, for the tests of console viewers that stop reading (they must not stall it).
bits 32
org 0x100000
%include "com1.inc"
%include "multiboot.inc"
MULTIBOOT_HEADER

start:
    mov esp, 0x80000
.again:
    mov esi, line
    call puts
    jmp .again

DEFINE_PUTC
DEFINE_PUTS

line: db "chatter chatter chatter chatter chatter chatter chatter chatter", 10, 0
image_end:
