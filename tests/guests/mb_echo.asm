; Multiboot kernel: prints a greeting, echoes COM1 input up to a newline (if any comes),
; exits with (0x2b << 1) | 1. With stdin closed the input never comes: the VMM's stdin
; handling must not matter, so the guest stops waiting after a bounded number of polls.
bits 32
org 0x100000
%include "com1.inc"
%include "multiboot.inc"
MULTIBOOT_HEADER

start:
    mov esp, 0x80000
    mov esi, hello
    call puts
    mov edi, 20000                  ; polls of LSR before giving up on input
.poll:
    mov dx, COM1_LSR
    in al, dx
    test al, LSR_DR
    jnz .byte
    dec edi
    jnz .poll
    jmp .done
.byte:
    mov dx, COM1
    in al, dx
    call putc
    cmp al, 10
    jne .poll
.done:
    mov esi, bye
    call puts
    EXIT_WITH 0x2b

DEFINE_PUTC
DEFINE_PUTS

hello: db "multiboot: hello", 10, 0
bye: db "multiboot: bye", 10, 0
image_end:
