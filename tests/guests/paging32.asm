; A multiboot kernel. 32-bit paging turned on by the guest (flat 32-bit, 1 MiB):
; identity-maps the first 4 MiB with 4 KiB pages and maps the virtual page 0x40000000 onto the physical page of
; `shared`. A value written through the alias must appear at the physical address.
; Prints "paging: alias ok" and exits with (0x26 << 1) | 1, or exits with 0x7f.
bits 32
org 0x100000
%include "com1.inc"
%include "multiboot.inc"
MULTIBOOT_HEADER

%define PD  0x300000
%define PT0 0x301000
%define PT1 0x302000

start:
    mov esp, 0x80000
    ; page table 0: identity for 0..4 MiB
    mov edi, PT0
    mov eax, 0x003                  ; present | writable
    mov ecx, 1024
.fill:
    mov [edi], eax
    add eax, 0x1000
    add edi, 4
    loop .fill
    mov dword [PD + 0], PT0 | 3
    ; 0x40000000 -> PD index 256, PT index 0 -> the page holding `shared`
    mov dword [PD + 256 * 4], PT1 | 3
    mov eax, shared
    and eax, 0xfffff000
    or eax, 3
    mov [PT1], eax
    mov eax, PD
    mov cr3, eax
    mov eax, cr0
    or eax, 0x80000000
    mov cr0, eax
    jmp .paged
.paged:
    mov eax, shared
    and eax, 0xfff
    mov dword [0x40000000 + eax], 0xfeedface
    cmp dword [shared], 0xfeedface
    jne .bad
    mov esi, msg
    call puts
    EXIT_WITH 0x26
.bad:
    EXIT_WITH 0x7f

DEFINE_PUTC
DEFINE_PUTS

msg: db "paging: alias ok", 10, 0
align 4096
shared: dd 0
image_end:
