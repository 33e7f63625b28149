; A multiboot test kernel that reads fw_cfg (ports 0x510/0x511) as kvm-unit-tests does:
; signature, ID, CPU count, maximum CPUs and RAM size, printed on COM1; then isa-debug-exit
; with 0x21 (exit status 0x43). Build: nasm -f bin fwcfg_probe.asm
%include "probe_io.inc"
bits 32
LOAD_ADDR equ 0x100000
MB_MAGIC  equ 0x1BADB002
MB_FLAGS  equ 0x00010000
        org LOAD_ADDR
header: dd MB_MAGIC, MB_FLAGS, -(MB_MAGIC + MB_FLAGS)
        dd header, LOAD_ADDR, load_end, bss_end, start

; select item AX, then read ECX bytes into EAX (little-endian, at most 4)
%macro FWCFG 2
        mov ax, %1
        mov ecx, %2
        call fwcfg_read
%endmacro

start:
        mov esp, stack_top
        mov esi, s_sig
        call puts32
        mov dx, 0x510
        xor eax, eax
        out dx, ax
        mov dx, 0x511
        mov ecx, 4
.sig:   in al, dx
        mov ah, al
        push edx
        push ecx
        mov al, ah
        call putc32
        pop ecx
        pop edx
        dec ecx
        jnz .sig
        mov al, 10
        call putc32
        mov esi, s_id
        call puts32
        FWCFG 0x01, 4
        call puthex32
        mov esi, s_cpus
        call puts32
        FWCFG 0x05, 2
        call puthex32
        mov esi, s_max
        call puts32
        FWCFG 0x0f, 2
        call puthex32
        mov esi, s_ram
        call puts32
        FWCFG 0x03, 4
        call puthex32
        mov al, 0x21
        out 0xf4, al
        hlt

fwcfg_read:                      ; AX: item, ECX: byte count -> EAX
        mov dx, 0x510
        out dx, ax
        mov dx, 0x511
        xor ebx, ebx
        mov edi, ecx
        xor ecx, ecx
.byte:  in al, dx
        movzx eax, al
        shl eax, cl
        or ebx, eax
        add ecx, 8
        dec edi
        jnz .byte
        mov eax, ebx
        ret

        PROBE_IO 32

s_sig   db "signature=", 0
s_id    db "id=", 0
s_cpus  db "nb_cpus=", 0
s_max   db "max_cpus=", 0
s_ram   db "ram_size=", 0
        align 4
load_end:
stack_top equ load_end + 0x1000
bss_end equ stack_top
