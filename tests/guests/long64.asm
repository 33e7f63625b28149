; 64-bit long mode entered by the VMM (paging, EFER.LMA, a 64-bit code segment): loaded
; at 2 MiB. Uses 64-bit registers and arithmetic, prints the result in hex, exits with
; (0x31 << 1) | 1.
bits 64
org 0x200000
%include "com1.inc"

start:
    lea rsi, [rel hello]
    call puts
    mov rax, 0x0123456789abcdef
    mov r8, 0x1111111111111111
    add rax, r8                     ; 0x12345678 9abcdf00 + carry work across 32 bits
    mov r15, rax
    mov rcx, 16
.hex:
    rol r15, 4
    mov al, r15b
    and al, 0x0f
    add al, '0'
    cmp al, '9'
    jbe .digit
    add al, 'a' - '9' - 1
.digit:
    call putc
    loop .hex
    mov al, 10
    call putc
    EXIT_WITH 0x31

DEFINE_PUTC
DEFINE_PUTS

hello: db "long mode: 0x0123456789abcdef + 0x1111111111111111 = 0x", 0
