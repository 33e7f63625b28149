; Multiboot kernel that echoes COM1 forever: the console tests type into it.
bits 32
org 0x100000
%include "com1.inc"
%include "multiboot.inc"
MULTIBOOT_HEADER

start:
    mov esp, 0x80000
    mov esi, hello
    call puts
.loop:
    call getc
    call putc
    jmp .loop

DEFINE_PUTC
DEFINE_GETC
DEFINE_PUTS

hello: db "echo ready", 10, 0
image_end:
