; The 16550A UART as Linux's 8250 driver probes and drives it: scratch register, FIFO
; detection through IIR, divisor latch, loopback (a byte written comes back, MSR mirrors
; MCR), then interrupt-driven output: THRE interrupt on IRQ 4 through the 8259, IIR
; naming the cause, the handler writing the next byte.
%define EXIT_CODE 0x4e
%include "lib.inc"

%define THR 0x3f8
%define IER 0x3f9
%define IIR 0x3fa
%define FCR 0x3fa
%define LCR 0x3fb
%define MCR 0x3fc
%define LSR 0x3fd
%define MSR 0x3fe
%define SCR 0x3ff

%macro INB 1
    mov dx, %1
    in al, dx
    movzx eax, al
%endmacro
%macro OUTB 2
    mov dx, %1
    mov al, %2
    out dx, al
%endmacro

main:
    OUTB SCR, 0xa5
    INB SCR
    SHOW "scr", eax
    OUTB FCR, 0x07                  ; FIFO on, both cleared
    INB IIR
    and eax, 0xc0
    SHOW "iir.fifo", eax
    OUTB LCR, 0x83                  ; DLAB: THR/IER are the divisor latch (no printing)
    OUTB THR, 0x0c                  ; 9600 baud
    OUTB IER, 0x00
    INB THR
    mov ebx, eax
    INB IER
    shl eax, 8
    or ebx, eax
    OUTB LCR, 0x03                  ; 8N1
    SHOW "divisor", ebx
    INB LCR
    SHOW "lcr", eax
    call nl

    ; loopback: nothing leaves the port (and nothing is printed meanwhile)
    OUTB MCR, 0x1a                  ; LOOP | RTS | OUT2
    INB MSR
    and eax, 0xf0
    mov [rec], eax                  ; CTS <- RTS, DCD <- OUT2
    OUTB MCR, 0x1f
    INB MSR
    and eax, 0xf0
    mov [rec + 4], eax
    OUTB THR, 0x5a
.rx:
    INB LSR
    test al, 1
    jz .rx
    INB THR
    mov [rec + 8], eax
    INB LSR
    and eax, 0x61
    mov [rec + 12], eax
    OUTB MCR, 0x0b                  ; DTR | RTS | OUT2, loopback off
    SHOW "msr", [rec]
    SHOW "msr", [rec + 4]
    SHOW "looped", [rec + 8]
    SHOW "lsr", [rec + 12]
    call nl

    ; interrupt-driven output on IRQ 4
    mov al, 0x11
    out 0x20, al
    mov al, 0x20
    out 0x21, al
    mov al, 0x04
    out 0x21, al
    mov al, 0x01
    out 0x21, al
    mov al, 0xef                    ; IRQ 4 only
    out 0x21, al
    mov dword [hook + 0x24 * 4], irq4
    mov dword [tx_pos], tx_msg
    INB IIR
    and eax, 0x0f
    SHOW "iir idle", eax
    call nl
    OUTB IER, 0x02                  ; THRE interrupt: the empty THR asks at once
.wait:
    sti
    hlt
    cli
    cmp dword [tx_done], 0
    je .wait
    OUTB IER, 0x00
    SHOW "first iir", [first_iir]
    SHOW "irqs>=1", 1
    call nl
    ret

irq4:
    push eax
    push edx
    push esi
    INB IIR
    and eax, 0x0f
    cmp dword [first_iir], -1
    jne .tx
    mov [first_iir], eax
.tx:
    mov esi, [tx_pos]
    mov al, [esi]
    test al, al
    jz .end
    mov dx, THR
    out dx, al
    inc dword [tx_pos]
    jmp .eoi
.end:
    OUTB IER, 0x00                  ; nothing left to send
    mov dword [tx_done], 1
.eoi:
    mov al, 0x20
    out 0x20, al
    pop esi
    pop edx
    pop eax
    add esp, 8
    iret

align 4
tx_pos: dd 0
rec: times 4 dd 0
tx_done: dd 0
first_iir: dd -1
tx_msg: db "sent by the THRE interrupt", 10, 0
END_IMAGE
