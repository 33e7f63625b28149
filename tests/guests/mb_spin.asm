; Multiboot kernel that prints a line and then spins: only a stop ends it.
bits 32
org 0x100000
%include "com1.inc"
%include "multiboot.inc"
MULTIBOOT_HEADER

start:
    mov esp, 0x80000
    mov esi, hello
    call puts
.spin:
    pause
    jmp .spin

DEFINE_PUTC
DEFINE_PUTS

hello: db "spinning", 10, 0
image_end:
