; A multiboot test kernel that reads CMOS/RTC registers through ports 0x70/0x71 and prints
; "cmosXX=000000YY" lines on COM1 (status registers, memory size bytes, date and time),
; then ends through isa-debug-exit with 0x21 (exit status 0x43).
; Build: nasm -f bin cmos_probe.asm
%include "probe_io.inc"
bits 32
LOAD_ADDR equ 0x100000
MB_MAGIC  equ 0x1BADB002
MB_FLAGS  equ 0x00010000
        org LOAD_ADDR
header: dd MB_MAGIC, MB_FLAGS, -(MB_MAGIC + MB_FLAGS)
        dd header, LOAD_ADDR, load_end, bss_end, start

start:
        mov esp, stack_top
        mov ebp, indexes
.next:
        movzx eax, byte [ebp]
        cmp al, 0xff
        je .done
        mov [cur], al
        mov esi, s_cmos
        call puts32
        movzx eax, byte [cur]          ; the index as two hex digits
        shr al, 4
        call digit
        movzx eax, byte [cur]
        and al, 0x0f
        call digit
        mov al, '='
        call putc32
        mov al, [cur]
        out 0x70, al
        in al, 0x71
        movzx eax, al
        call puthex32
        inc ebp
        jmp .next
.done:
        mov al, 0x21
        out 0xf4, al
        hlt

digit:  add al, '0'
        cmp al, '9'
        jbe .out
        add al, 'a' - '0' - 10
.out:   jmp putc32

        PROBE_IO 32

indexes db 0x0a, 0x0b, 0x0d, 0x15, 0x16, 0x17, 0x18, 0x30, 0x31, 0x34, 0x35
        db 0x5b, 0x5c, 0x5d, 0x32, 0x09, 0x08, 0x07, 0x04, 0x02, 0xff
s_cmos  db "cmos", 0
cur     db 0
        align 4
load_end:
stack_top equ load_end + 0x1000
bss_end equ stack_top
