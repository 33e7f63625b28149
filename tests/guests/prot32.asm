; Flat 32-bit protected mode set up by the VMM: loaded at 1 MiB, CS/DS flat 4 GiB.
; Computes the sum 1..1000 and prints it in decimal, then exits with (0x21 << 1) | 1.
bits 32
org 0x100000
%include "com1.inc"

start:
    mov esi, hello
    call puts
    xor eax, eax
    mov ecx, 1000
.sum:
    add eax, ecx
    loop .sum
    call putdec
    mov al, 10
    call putc
    EXIT_WITH 0x21

; putdec: print EAX in decimal.
putdec:
    mov ebx, 10
    xor ecx, ecx
.div:
    xor edx, edx
    div ebx
    push edx
    inc ecx
    test eax, eax
    jnz .div
.out:
    pop eax
    add al, '0'
    call putc
    loop .out
    ret

DEFINE_PUTC
DEFINE_PUTS

hello: db "protected mode: sum 1..1000 = ", 0
