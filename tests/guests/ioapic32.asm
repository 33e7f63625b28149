; External interrupts into local APICs (a multiboot kernel; two vCPUs start here together,
; flat 32-bit, on the PC machine with its 8259s, PIT and IOAPIC). The PIT ticks at 1 kHz.
; vCPU 0 takes 3 ticks through the 8259 and LINT0 in ExtINT mode (virtual wire), masks
; the 8259, takes 3 through IOAPIC pin 2 sent to logical (flat) destination 0x01 = itself,
; then points pin 2 at physical APIC id 1 and waits until vCPU 1 took 3. It prints
; "ioapic: extint, logical, physical" and exits with (0x2d << 1) | 1.
bits 32
org 0x100000
%include "com1.inc"
%include "apic.inc"
%include "multiboot.inc"
MULTIBOOT_HEADER

%define IOAPIC 0xfec00000

%macro RTE 3                            ; pin, low dword, high dword
    mov dword [IOAPIC], 0x10 + 2 * %1 + 1
    mov dword [IOAPIC + 0x10], %3
    mov dword [IOAPIC], 0x10 + 2 * %1
    mov dword [IOAPIC + 0x10], %2
%endmacro

start:
    mov eax, 1
    cpuid
    shr ebx, 24
    mov edi, ebx
    mov esp, edi
    shl esp, 12
    neg esp
    add esp, 0x80000
    GATE 0x20, pic_tick
    GATE 0x31, bsp_tick
    GATE 0x32, ap_tick
    lidt [idt_desc]
    mov dword [APIC + 0xf0], 0x1ff      ; SVR: enabled
    test edi, edi
    jnz ap
    mov dword [APIC + 0x350], 0x700     ; LINT0: ExtINT, unmasked (virtual wire)
    mov dword [APIC + 0xd0], 0x01000000 ; LDR: logical id bit 0 (flat model)
    ; 8259: vectors 0x20-0x2f, only IRQ0 open
    mov al, 0x11
    out 0x20, al
    out 0xa0, al
    mov al, 0x20
    out 0x21, al
    mov al, 0x28
    out 0xa1, al
    mov al, 0x04
    out 0x21, al
    mov al, 0x02
    out 0xa1, al
    mov al, 0x01
    out 0x21, al
    out 0xa1, al
    mov al, 0xfe
    out 0x21, al
    mov al, 0xff
    out 0xa1, al
    mov al, 0x34                        ; PIT channel 0, mode 2, ~1 kHz
    out 0x43, al
    mov ax, 1193
    out 0x40, al
    mov al, ah
    out 0x40, al
    sti
.pic:
    hlt
    cmp dword [pic_ticks], 3
    jb .pic
    cli
    mov al, 0xff                        ; 8259 closed
    out 0x21, al
    RTE 2, 0x31 | (1 << 11), 0x01000000 ; fixed, logical, destination 0x01
    sti
.logical:
    hlt
    cmp dword [bsp_ticks], 3
    jb .logical
.wait_ap:
    cmp dword [ap_ready], 1
    jne .wait_ap
    RTE 2, 0x32, 0x01000000             ; fixed, physical, APIC id 1
.physical:                              ; no ticks come here now: spin, don't sleep
    pause
    cmp dword [ap_ticks], 3
    jb .physical
    cli
    RTE 2, 0x10000, 0                   ; masked
    mov esi, msg
    call puts
    EXIT_WITH 0x2d

ap:
    sti
    mov dword [ap_ready], 1
.park:
    hlt
    jmp .park

pic_tick:
    push eax
    inc dword [pic_ticks]
    mov al, 0x20
    out 0x20, al
    pop eax
    iret

COUNTING_HANDLER bsp_tick, bsp_ticks

COUNTING_HANDLER ap_tick, ap_ticks

DEFINE_PUTC
DEFINE_PUTS

msg: db "ioapic: extint, logical, physical", 10, 0
align 4
pic_ticks: dd 0
bsp_ticks: dd 0
ap_ticks: dd 0
ap_ready: dd 0
DEFINE_IDT
image_end:
