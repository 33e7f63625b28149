; Flat 32-bit, at 1 MiB (entered by boot.flat32: code selector 0x08). PIT channel 0 at
; 20 Hz (mode 2, 59659 clocks) on IRQ 0; the handler notes the TSC of each tick at TICKS
; and sends EOI. With interrupts on, the guest runs BLOCKS blocks it never ran before
; (each translated or decoded as it first runs), notes the TSC before and after them and
; the end of the tick list at COUNT, then stops with HLT and interrupts off.
bits 32
org 0x100000
%include "pic.inc"
%include "idt.inc"
%ifndef BLOCKS
%define BLOCKS 12000
%endif
IDT equ 0x300000
TSC_START equ 0x200000
TSC_END equ 0x200008
COUNT equ 0x200010
TICKS equ 0x200100

start:
    mov esp, 0x80000
    IDT_GATE IDT, 0x20, timer
    lidt [idt_desc]
    PIC_IRQ0_ONLY
    mov al, 0x34
    out 0x43, al
    mov ax, 59659
    out 0x40, al
    mov al, ah
    out 0x40, al
    mov edi, TICKS
    rdtsc
    mov [TSC_START], eax
    mov [TSC_START + 4], edx
    sti
%rep BLOCKS
    add ebx, 1
    jmp short $ + 2
%endrep
    cli
    rdtsc
    mov [TSC_END], eax
    mov [TSC_END + 4], edx
    mov [COUNT], edi
    hlt

timer:
    push eax
    push edx
    rdtsc
    mov [edi], eax
    mov [edi + 4], edx
    add edi, 8
    mov al, 0x20
    out 0x20, al
    pop edx
    pop eax
    iret

idt_desc:
    dw 256 * 8 - 1
    dd IDT
