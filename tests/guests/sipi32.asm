; SMP start the PC way, through the in-kernel local APIC: the BSP (flat 32-bit, 1 MiB)
; copies a real-mode trampoline to 0x8000, sends INIT then STARTUP (vector 0x08) to
; every other CPU with the xAPIC ICR, and waits until each has counted itself in at
; 0x7000. Each AP prints "ap up" from real mode. Exits with (0x29 << 1) | 1.
bits 32
org 0x100000
%include "com1.inc"

%define APIC_ICR_LO 0xfee00300
%define APIC_ICR_HI 0xfee00310

start:
    mov esp, 0x80000
    mov dword [0x7000], 0
    mov dword [0x7004], 0               ; the APs' print lock
    mov esi, trampoline
    mov edi, 0x8000
    mov ecx, trampoline_end - trampoline
    rep movsb
    mov eax, 1
    cpuid
    shr ebx, 16
    and ebx, 0xff
    dec ebx
    mov [aps], ebx
    mov dword [APIC_ICR_HI], 0
    mov dword [APIC_ICR_LO], 0x000c4500  ; INIT, all excluding self
    mov ecx, 100000
.delay:
    loop .delay
    mov dword [APIC_ICR_LO], 0x000c4608  ; STARTUP, vector 0x08 -> 0x8000
.wait:
    mov eax, [0x7000]
    cmp eax, [aps]
    jb .wait
    mov esi, done
    call puts
    EXIT_WITH 0x29

DEFINE_PUTC
DEFINE_PUTS

align 4
aps: dd 0
done: db "bsp: all aps up", 10, 0

bits 16
trampoline:                             ; runs at 0000:8000, position-independent
    cli
    xor ax, ax
    mov ds, ax
.lock:
    mov ax, 1
    xchg ax, [0x7004]
    test ax, ax
    jnz .lock
    mov dx, COM1
    mov al, 'a'
    out dx, al
    mov al, 'p'
    out dx, al
    mov al, ' '
    out dx, al
    mov al, 'u'
    out dx, al
    mov al, 'p'
    out dx, al
    mov al, 10
    out dx, al
    mov word [0x7004], 0
    lock inc dword [0x7000]
.park:
    hlt
    jmp .park
trampoline_end:
