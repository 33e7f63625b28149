; Multiboot kernel that checks for boite's power-off port (0x505 reads "BOOT") and
; writes 0 to it: a clean power-off, exit status 0. Without the port: exits via 0xf4.
bits 32
org 0x100000
%include "com1.inc"
%include "multiboot.inc"
MULTIBOOT_HEADER

start:
    mov dx, 0x505
    in eax, dx
    cmp eax, 0x544f4f42
    jne .no_port
    xor eax, eax
    out dx, al
.no_port:
    EXIT_WITH 0x7e
image_end:
