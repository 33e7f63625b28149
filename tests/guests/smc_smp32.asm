; Cross-CPU code modification (flat 32-bit, 1 MiB, two vCPUs started together). vCPU 1
; calls `func` (on a page of its own) until vCPU 0 sees it has run often enough to be
; translated, then vCPU 0 rewrites the immediate `func` returns. vCPU 1 must see the
; new value; it gives up after 1,000,000 calls that return the old one. vCPU 0 exits
; with (0x2b << 1) | 1 when vCPU 1 saw it, with (0x2c << 1) | 1 when it gave up.
bits 32
org 0x100000
%include "com1.inc"

start:
    mov eax, 1
    cpuid
    shr ebx, 24
    test ebx, ebx
    jnz ap
    mov esp, 0x80000
.wait_hot:
    cmp dword [calls], 5000
    jb .wait_hot
    mov dword [func + 1], 2             ; func: mov eax, 1 -> mov eax, 2
.wait_seen:
    mov eax, [seen]
    test eax, eax
    jz .wait_seen
    cmp eax, 1
    jne .gave_up
    EXIT_WITH 0x2b
.gave_up:
    EXIT_WITH 0x2c

ap:
    mov esp, 0x7f000
    xor ecx, ecx
.loop:
    call func
    cmp eax, 2
    je .saw
    inc dword [calls]
    inc ecx
    cmp ecx, 1000000
    jb .loop
    mov dword [seen], 2
    jmp .park
.saw:
    mov dword [seen], 1
.park:
    cli
    hlt
    jmp .park

align 4
calls: dd 0
seen: dd 0

align 4096
func:
    mov eax, 1
    ret
