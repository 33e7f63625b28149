; Multiboot kernel that jumps into the PCI hole: KVM cannot fetch instructions from
; MMIO, so this is an emulation failure on any KVM.
bits 32
org 0x100000
%include "multiboot.inc"
MULTIBOOT_HEADER

start:
    mov eax, 0xd0000000
    jmp eax
image_end:
