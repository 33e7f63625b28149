; Multiboot kernel that waits for Ctrl-Alt-Del on the keyboard (polling the i8042: status
; port 0x64 bit 0, data port 0x60) and then powers off cleanly through boite's power-off
; port (0x505, exit status 0): what `boite stop BOX soft` asks of a guest.
bits 32
org 0x100000
%include "com1.inc"
%include "multiboot.inc"
MULTIBOOT_HEADER

start:
    mov esp, 0x80000
    mov esi, waiting
    call puts
    xor ebx, ebx                    ; bit 0: Ctrl down, bit 1: Alt down, bit 2: E0 prefix
.poll:
    in al, 0x64
    test al, 1
    jz .poll
    in al, 0x60
    cmp al, 0xe0
    je .prefix
    test bl, 4
    jnz .extended
    cmp al, 0x1d
    je .ctrl
    cmp al, 0x38
    je .alt
    jmp .poll
.prefix:
    or bl, 4
    jmp .poll
.ctrl:
    or bl, 1
    jmp .poll
.alt:
    or bl, 2
    jmp .poll
.extended:
    and bl, ~4
    cmp al, 0x53                    ; Delete (make)
    jne .poll
    cmp bl, 3
    jne .poll
    mov esi, bye
    call puts
    mov dx, 0x505
    xor eax, eax
    out dx, al
    EXIT_WITH 0x7e                  ; only without the power-off port

DEFINE_PUTC
DEFINE_PUTS

waiting: db "waiting for ctrl-alt-del", 10, 0
bye: db "ctrl-alt-del: powering off", 10, 0
image_end:
