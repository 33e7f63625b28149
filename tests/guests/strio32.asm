; String I/O: `rep outsb` to COM1, `rep insw` of 8 words from port 0x520 (the test's
; counter device) into memory, then `rep outsd` of those 16 bytes as 4 dwords to port
; 0x524. KVM hands each as one exit with a count. Exits with (0x2a << 1) | 1.
bits 32
org 0x100000
%include "com1.inc"

start:
    cld
    mov esi, msg
    mov ecx, msg_end - msg
    mov dx, COM1
    rep outsb
    mov edi, buffer
    mov ecx, 8
    mov dx, 0x520
    rep insw
    mov esi, buffer
    mov ecx, 4
    mov dx, 0x524
    rep outsd
    EXIT_WITH 0x2a

msg: db "string io ok", 10
msg_end:
align 4
buffer: times 16 db 0
