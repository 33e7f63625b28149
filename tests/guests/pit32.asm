; A multiboot kernel. PIT timer interrupts handled by the guest's own IDT (flat 32-bit, 1 MiB; needs the
; in-kernel PIC and PIT). The 8259 PIC is remapped to vectors 0x20-0x2f, PIT channel 0
; programmed at 1 kHz (mode 2); the handler counts ticks and sends EOI. After 10 ticks
; the guest prints "pit: 10 ticks" and exits with (0x25 << 1) | 1.
bits 32
org 0x100000
%include "com1.inc"
%include "multiboot.inc"
%include "pic.inc"
%include "idt.inc"
MULTIBOOT_HEADER

start:
    mov esp, 0x80000
    IDT_GATE idt, 0x20, timer       ; IDT entry 0x20 -> timer handler
    lidt [idt_desc]
    PIC_IRQ0_ONLY                   ; 8259: vectors 0x20-0x2f, only IRQ0 unmasked
    ; PIT channel 0, lobyte/hibyte, mode 2, divisor 1193 (~1 kHz)
    mov al, 0x34
    out 0x43, al
    mov ax, 1193
    out 0x40, al
    mov al, ah
    out 0x40, al
    sti
.idle:
    hlt
    cmp dword [ticks], 10
    jb .idle
    cli
    mov esi, msg
    call puts
    EXIT_WITH 0x25

timer:
    push eax
    inc dword [ticks]
    mov al, 0x20
    out 0x20, al
    pop eax
    iret

DEFINE_PUTC
DEFINE_PUTS

msg: db "pit: 10 ticks", 10, 0
align 4
ticks: dd 0
idt_desc:
    dw 256 * 8 - 1
    dd idt
align 8
idt: times 256 * 8 db 0
image_end:
