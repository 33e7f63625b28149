; The CMOS RTC periodic interrupt through the cascaded slave 8259: register A rate,
; register B PIE, IRQ 8 latched in the slave's IRR and delivered at slave base + 0 once
; IF=1, ISR bits of both chips in the handler (slave IRQ 0, master IRQ 2), register C
; flags (IRQF, PF) cleared by reading, EOI to slave then master, HLT woken tick by tick,
; and priority: with IRQ 0 and IRQ 8 both pending, IRQ 0 is delivered first.
%define EXIT_CODE 0x46
%include "lib.inc"

%macro CMOS_READ 1
    mov al, %1
    out 0x70, al
    in al, 0x71
%endmacro
%macro CMOS_WRITE 2                 ; register, value in BL
    mov al, %1
    out 0x70, al
    mov al, %2
    out 0x71, al
%endmacro

main:
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
    mov al, 0xfb                    ; master: only the cascade
    out 0x21, al
    mov al, 0xfe                    ; slave: only IRQ 8
    out 0xa1, al
    mov dword [hook + 0x28 * 4], irq8

    CMOS_READ 0x0d
    movzx eax, al
    SHOW "regD", eax
    CMOS_READ 0x0a
    and al, 0xf0
    or al, 0x06                     ; 1024 Hz
    mov bl, al
    CMOS_WRITE 0x0a, bl
    CMOS_READ 0x0a
    and eax, 0x7f                   ; not UIP
    SHOW "regA", eax
    CMOS_READ 0x0c                  ; clear stale flags
    CMOS_READ 0x0b
    or al, 0x40                     ; PIE
    mov bl, al
    CMOS_WRITE 0x0b, bl
    CMOS_READ 0x0b
    and eax, 0x40
    SHOW "regB.PIE", eax
    call nl

    ; IF=0: the request waits in the slave's IRR, and the cascade in the master's
.wait:
    mov al, 0x0a
    out 0xa0, al
    in al, 0xa0
    test al, 1
    jz .wait
    mov al, 0x0a
    out 0x20, al
    in al, 0x20
    and eax, 0x04
    SHOW "master irr.2", eax
    call nl
    sti
    nop
    cli
    SHOW "vector", [s_vec]
    SHOW "isr m/s", [s_isr]
    SHOW "after eoi", [s_isr_eoi]
    SHOW "regC", [s_c]
    call nl
.ticks:
    sti
    hlt
    cli
    cmp dword [ticks], 4
    jb .ticks
    SHOW "ticks>=4", 1
    call nl

    ; priority: IRQ 0 (master) and IRQ 8 (slave, through IRQ 2) both pending with IF=0:
    ; IRQ 0 comes first, IRQ 8 right after its handler's IRET
    mov dword [hook + 0x20 * 4], irq0
    mov al, 0x34                    ; PIT channel 0, mode 2, slowest rate
    out 0x43, al
    xor al, al
    out 0x40, al
    out 0x40, al
    mov al, 0xfa                    ; master: IRQ 0 and the cascade
    out 0x21, al
.both:
    mov al, 0x0a
    out 0x20, al
    in al, 0x20
    mov bl, al
    mov al, 0x0a
    out 0xa0, al
    in al, 0xa0
    and al, 1
    and bl, 1
    and al, bl
    jz .both
    mov dword [order_n], 0
    sti
    nop
    nop
    nop
    cli
    SHOW "first", [order]
    SHOW "second", [order + 4]
    call nl
    mov al, 0xff
    out 0x21, al
    CMOS_READ 0x0b
    and al, ~0x40
    mov bl, al
    CMOS_WRITE 0x0b, bl
    ret

record_order:                       ; EAX = vector
    push ebx
    mov ebx, [order_n]
    cmp ebx, 2
    jae .full
    mov [order + ebx * 4], eax
    inc dword [order_n]
.full:
    pop ebx
    ret

irq0:
    push eax
    mov eax, 0x20
    call record_order
    mov al, 0x20
    out 0x20, al
    pop eax
    add esp, 8
    iret

isr_pair:                           ; EAX = master ISR << 8 | slave ISR
    mov al, 0x0b
    out 0x20, al
    out 0xa0, al
    in al, 0x20
    mov ah, al
    in al, 0xa0
    movzx eax, ax
    ret

irq8:
    push eax
    mov eax, 0x28
    call record_order
    cmp dword [ticks], 0
    jne .eoi
    mov eax, [esp + 4]
    mov [s_vec], eax
    call isr_pair
    mov [s_isr], eax
    CMOS_READ 0x0c
    and eax, 0xc0
    mov [s_c], eax
    mov al, 0x20
    out 0xa0, al
    out 0x20, al
    call isr_pair
    mov [s_isr_eoi], eax
    jmp .done
.eoi:
    CMOS_READ 0x0c                  ; acknowledge, or no further interrupt comes
    mov al, 0x20
    out 0xa0, al
    out 0x20, al
.done:
    inc dword [ticks]
    pop eax
    add esp, 8
    iret

align 4
ticks: dd 0
order_n: dd 2
order: dd 0, 0
s_vec: dd 0
s_isr: dd 0
s_isr_eoi: dd 0
s_c: dd 0
END_IMAGE
