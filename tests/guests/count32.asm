; Counts from 1 to LIMIT, writing each value (dword) to port 0x510, then exits with
; (0x28 << 1) | 1. The counter lives in EBX, so a paused and restored vCPU must carry on
; from the saved value. Flat 32-bit, loaded at 1 MiB.
bits 32
org 0x100000
%include "com1.inc"

%ifndef LIMIT
%define LIMIT 100000
%endif

start:
    xor ebx, ebx
.next:
    inc ebx
    mov eax, ebx
    mov dx, 0x510
    out dx, eax
    cmp ebx, LIMIT
    jb .next
    EXIT_WITH 0x28
