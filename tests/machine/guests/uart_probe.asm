; A multiboot test kernel that drives COM2 (0x2f8) register by register and reports each
; value on COM1 as "rNN=000000VV" (NN = step number), so the same steps can be compared
; between boite's 16550A and QEMU's. Ends through isa-debug-exit with 0x21.
; Build: nasm -f bin uart_probe.asm
%include "probe_io.inc"
bits 32
LOAD_ADDR equ 0x100000
MB_MAGIC  equ 0x1BADB002
MB_FLAGS  equ 0x00010000
U         equ 0x2f8
        org LOAD_ADDR
header: dd MB_MAGIC, MB_FLAGS, -(MB_MAGIC + MB_FLAGS)
        dd header, LOAD_ADDR, load_end, bss_end, start

%macro WR 2                      ; register offset, value
        mov dx, U + %1
        mov al, %2
        out dx, al
%endmacro
%macro RD 1                      ; register offset: report the value read
        mov dx, U + %1
        in al, dx
        call report
%endmacro

start:
        mov esp, stack_top
        mov byte [step], 0
        RD 2                     ; 00 IIR at reset: no interrupt, no FIFO
        RD 5                     ; 01 LSR: THRE | TEMT
        RD 3                     ; 02 LCR
        WR 7, 0x5a
        RD 7                     ; 03 scratch
        WR 3, 0x83               ; DLAB
        WR 0, 0x01
        WR 1, 0x00
        RD 0                     ; 04 DLL
        RD 1                     ; 05 DLM
        WR 3, 0x03
        RD 1                     ; 06 IER
        WR 1, 0x0f
        RD 1                     ; 07 IER takes its 4 bits
        WR 1, 0x00
        WR 2, 0x07               ; FIFO on, cleared, trigger 1
        RD 2                     ; 08 IIR: FIFO bits
        WR 4, 0x10               ; loopback
        WR 4, 0x1a               ; loopback, OUT2, RTS
        RD 6                     ; 09 MSR (upper nibble compared)
        WR 1, 0x01               ; receive interrupts
        WR 0, 'A'
        WR 0, 'B'
        RD 5                     ; 10 LSR: data ready
        RD 2                     ; 11 IIR: received data available
        RD 0                     ; 12 'A'
        RD 0                     ; 13 'B'
        RD 5                     ; 14 LSR: empty again
        RD 2                     ; 15 IIR: nothing
        WR 1, 0x02               ; THRE interrupt
        RD 2                     ; 16 IIR: THRE
        RD 2                     ; 17 IIR: cleared by the read
        WR 1, 0x00
        mov ecx, 18              ; overrun the 16-byte FIFO in loopback
.fill:  WR 0, 'x'
        dec ecx
        jnz .fill
        RD 5                     ; 18 LSR: data ready and overrun
        RD 5                     ; 19 LSR: overrun cleared by the read
        WR 2, 0x03               ; clear the receive FIFO
        RD 5                     ; 20 LSR: no data
        WR 4, 0x00
        RD 4                     ; 21 MCR
        mov al, 0x21
        out 0xf4, al
        hlt

report:                          ; AL: the value; prints "rNN=" then it in hex
        mov [val], al
        mov al, 'r'
        call putc32
        movzx eax, byte [step]
        mov bl, 10
        div bl
        add al, '0'
        mov [ones], ah
        call putc32
        mov al, [ones]
        add al, '0'
        call putc32
        mov al, '='
        call putc32
        movzx eax, byte [val]
        call puthex32
        inc byte [step]
        ret

        PROBE_IO 32

step    db 0
val     db 0
ones    db 0
        align 4
load_end:
stack_top equ load_end + 0x1000
bss_end equ stack_top
