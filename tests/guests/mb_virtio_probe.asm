; Multiboot kernel that looks at the first two virtio-mmio windows (0xd0000000, 4 KiB
; apart): for each with the "virt" magic it prints "virtio <window> id <device id>"; then
; it exits with (0x2c << 1) | 1. `boite boot --disk FILE` must show a block device (id 2).
bits 32
org 0x100000
%include "com1.inc"
%include "multiboot.inc"
MULTIBOOT_HEADER

start:
    mov esp, 0x80000
    mov ebx, 0xd0000000
    xor edi, edi
.window:
    cmp dword [ebx], 0x74726976     ; "virt"
    jne .next
    mov esi, s_virtio
    call puts
    mov eax, edi
    add al, '0'
    call putc
    mov esi, s_id
    call puts
    mov eax, [ebx + 8]              ; DeviceID
    add al, '0'
    call putc
    mov al, 10
    call putc
.next:
    add ebx, 0x1000
    inc edi
    cmp edi, 2
    jb .window
    EXIT_WITH 0x2c

DEFINE_PUTC
DEFINE_PUTS

s_virtio: db "virtio ", 0
s_id: db " id ", 0
image_end:
