; A multiboot test kernel for the 8259 pair and the 8254 without taking interrupts (IF
; stays 0): PIT status read-back, channel 2's OUT through port 0x61, IRQ 0 reaching the
; master's IRR, the poll command, ISR and EOI. Each value goes to COM1 as "rNN=000000VV".
; Ends through isa-debug-exit with 0x21. Build: nasm -f bin pic_pit_probe.asm
%include "probe_io.inc"
bits 32
LOAD_ADDR equ 0x100000
MB_MAGIC  equ 0x1BADB002
MB_FLAGS  equ 0x00010000
        org LOAD_ADDR
header: dd MB_MAGIC, MB_FLAGS, -(MB_MAGIC + MB_FLAGS)
        dd header, LOAD_ADDR, load_end, bss_end, start

%macro OUTB 2
        mov al, %2
        out %1, al
%endmacro
%macro REPORT_IN 1
        in al, %1
        call report
%endmacro

start:
        mov esp, stack_top
        OUTB 0x43, 0x34                 ; ch0: word, mode 2
        OUTB 0x43, 0xe2                 ; read-back status of ch0
        REPORT_IN 0x40                  ; 00 status before the count
        OUTB 0x40, 0x00
        OUTB 0x40, 0x01                 ; count 0x100
        OUTB 0x43, 0xe2
        REPORT_IN 0x40                  ; 01 status with the count loaded
        OUTB 0x61, 0x00                 ; gate 2 low, speaker off
        OUTB 0x43, 0xb0                 ; ch2: word, mode 0
        OUTB 0x42, 0x10
        OUTB 0x42, 0x00                 ; count 16
        in al, 0x61
        and al, 0x23
        call report                     ; 02 port 0x61: OUT2 low, gate low
        OUTB 0x61, 0x01                 ; gate 2 high: counting
        mov ecx, 1000000
.out2:  in al, 0x61
        test al, 0x20
        jnz .out2_done
        dec ecx
        jnz .out2
.out2_done:
        and al, 0x23
        call report                     ; 03 port 0x61: OUT2 high, gate high

        OUTB 0x20, 0x11                 ; the PICs as Linux sets them up
        OUTB 0x21, 0x20
        OUTB 0x21, 0x04
        OUTB 0x21, 0x01
        OUTB 0xa0, 0x11
        OUTB 0xa1, 0x28
        OUTB 0xa1, 0x02
        OUTB 0xa1, 0x01
        OUTB 0x21, 0xfe                 ; only IRQ 0
        OUTB 0xa1, 0xff
        REPORT_IN 0x21                  ; 04 master IMR
        REPORT_IN 0xa1                  ; 05 slave IMR
        OUTB 0x43, 0x30                 ; ch0: word, mode 0, count 64
        OUTB 0x40, 0x40
        OUTB 0x40, 0x00
        OUTB 0x20, 0x0a                 ; read IRR
        mov ecx, 1000000
.irr:   in al, 0x20
        test al, 0x01
        jnz .irr_done
        dec ecx
        jnz .irr
.irr_done:
        and al, 0x01
        call report                     ; 06 IRR bit 0: IRQ 0 requested
        OUTB 0x20, 0x0c                 ; poll
        REPORT_IN 0x20                  ; 07 poll word: 0x80 | 0
        OUTB 0x20, 0x0b
        REPORT_IN 0x20                  ; 08 ISR: the poll acknowledged IRQ 0
        OUTB 0x20, 0x20                 ; non-specific EOI
        REPORT_IN 0x20                  ; 09 ISR empty
        OUTB 0x20, 0x0a
        in al, 0x20
        and al, 0x01
        call report                     ; 10 IRR bit 0 cleared by the acknowledge
        OUTB 0x20, 0x0c
        REPORT_IN 0x20                  ; 11 poll with nothing pending
        mov al, 0x21
        out 0xf4, al
        hlt

report:                                 ; AL: the value; prints "rNN=" then it in hex
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
