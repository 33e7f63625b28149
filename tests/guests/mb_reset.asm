; Multiboot kernel that prints "boot" and resets the machine through the reset control
; register (0xcf9: hard reset, then RST_CPU), as Linux's reboot=pci does. Every boot
; prints again: the VMM must come back from each reset with a fresh machine.
bits 32
org 0x100000
%include "com1.inc"
%include "multiboot.inc"
MULTIBOOT_HEADER

start:
    mov esp, 0x80000
    mov esi, msg
    call puts
    mov dx, 0xcf9
    mov al, 0x02
    out dx, al
    mov al, 0x06
    out dx, al
.stuck:
    jmp .stuck

DEFINE_PUTC
DEFINE_PUTS

msg: db "boot", 10, 0
image_end:
