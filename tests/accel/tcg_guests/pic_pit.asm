; The 8259 PIC pair and the 8254 PIT: initialisation (ICW1-4, IMR read back), PIT mode and
; read-back status, IRQ0 latched in IRR while IF=0 or masked, delivered one instruction
; after STI (the interrupt shadow) at vector base + 0, ISR set in the handler and cleared
; by EOI, HLT woken by the timer tick after tick, nothing delivered while masked, and
; channel 2 in mode 0 seen through port 0x61 (gate, OUT2).
; Only what does not depend on timing is printed.
%define EXIT_CODE 0x45
%include "lib.inc"

%define DIVISOR 1193                ; about 1 kHz

main:
    ; PIC: master at 0x20, slave at 0x28, cascade on IRQ2, 8086 mode, all masked
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
    mov al, 0xff
    out 0x21, al
    out 0xa1, al
    in al, 0x21
    movzx eax, al
    SHOW "imr", eax
    mov al, 0xa5
    out 0xa1, al
    in al, 0xa1
    movzx eax, al
    SHOW "imr2", eax
    mov al, 0xff
    out 0xa1, al
    call nl
    mov dword [hook + 0x20 * 4], irq0

    ; PIT channel 0: mode 2, lo/hi, binary
    mov al, 0x34
    out 0x43, al
    mov ax, DIVISOR
    out 0x40, al
    mov al, ah
    out 0x40, al
    mov al, 0xe2                    ; read-back: status of channel 0
    out 0x43, al
    in al, 0x40
    and eax, 0x3f                   ; access, mode, BCD (not OUT, not null count)
    SHOW "pit status", eax
    mov al, 0x00                    ; latch channel 0
    out 0x43, al
    in al, 0x40
    mov ah, al
    in al, 0x40
    xchg al, ah
    movzx eax, ax
    cmp eax, DIVISOR
    setbe al
    movzx eax, al
    SHOW "count<=divisor", eax
    call nl

    ; IRQ0 unmasked with IF=0: it waits in IRR
    mov al, 0xfe
    out 0x21, al
    call wait_irr0
    call read_isr
    SHOW "isr", eax
    call nl
    mov dword [marker], 0
    sti
    mov dword [marker], 1           ; the shadow: this runs before the interrupt
    mov dword [marker], 2
    cli
    SHOW "marker", [seen_marker]
    SHOW "vector", [seen_vec]
    SHOW "isr in handler", [seen_isr]
    SHOW "isr after eoi", [seen_isr_eoi]
    SHOW "fl in handler", [seen_fl]
    call nl

    ; HLT until the fifth tick
.ticks:
    sti
    hlt
    cli
    cmp dword [ticks], 5
    jb .ticks
    SHOW "ticks>=5", 1
    call nl

    ; masked: IRR fills, nothing is delivered; unmasked: delivered after STI's shadow
    mov al, 0xff
    out 0x21, al
    mov ebx, [ticks]
    sti
    call wait_irr0
    cli
    mov eax, [ticks]
    sub eax, ebx
    SHOW "ticks while masked", eax
    mov dword [seen_marker], 0xffffffff
    mov al, 0xfe
    out 0x21, al
    mov dword [marker], 0
    sti
    mov dword [marker], 1
    mov dword [marker], 2
    cli
    SHOW "marker", [seen_marker]
    call nl
    mov al, 0xff
    out 0x21, al
    call read_isr
    SHOW "isr", eax
    call nl

    ; channel 2 through port 0x61, as Linux calibrates the TSC: gate on, speaker off,
    ; mode 0: OUT2 (port 0x61 bit 5) low once the count is written, high at terminal count
    in al, 0x61
    and al, 0xfc
    or al, 1
    out 0x61, al
    mov al, 0xb0                    ; channel 2, lo/hi, mode 0
    out 0x43, al
    xor al, al
    out 0x42, al
    mov al, 0x10                    ; 0x1000 ticks, about 3.4 ms
    out 0x42, al
    in al, 0x61
    and eax, 0x23
    SHOW "port61", eax
.out2:
    in al, 0x61
    test al, 0x20
    jz .out2
    and eax, 0x23
    SHOW "port61", eax
    in al, 0x61
    and al, 0xfc                    ; gate off again
    out 0x61, al
    call nl
    ret

; poll IRR (OCW3 read IRR) until IRQ0 is requested
wait_irr0:
    push eax
.w: mov al, 0x0a
    out 0x20, al
    in al, 0x20
    test al, 1
    jz .w
    pop eax
    ret

read_isr:
    mov al, 0x0b
    out 0x20, al
    in al, 0x20
    movzx eax, al
    ret

irq0:
    push eax
    cmp dword [seen_marker], 0xffffffff
    jne .rec
    mov eax, [marker]
    mov [seen_marker], eax
.rec:
    cmp dword [ticks], 0
    jne .eoi
    mov eax, [marker]
    mov [seen_marker], eax
    mov eax, [esp + 4]
    mov [seen_vec], eax
    pushfd
    pop eax
    and eax, 0x200
    mov [seen_fl], eax
    call read_isr
    mov [seen_isr], eax
    mov al, 0x20
    out 0x20, al
    call read_isr
    mov [seen_isr_eoi], eax
    jmp .done
.eoi:
    mov al, 0x20
    out 0x20, al
.done:
    inc dword [ticks]
    pop eax
    add esp, 8
    iret

align 4
marker: dd 0
ticks: dd 0
seen_marker: dd 0
seen_vec: dd 0
seen_isr: dd 0
seen_isr_eoi: dd 0
seen_fl: dd 0
END_IMAGE
