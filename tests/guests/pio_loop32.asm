; The port-I/O exit benchmark guest, a multiboot (v1) kernel with the a.out kludge so
; both boite and `qemu-system-x86_64 -kernel` load it at 1 MiB in flat 32-bit mode.
; It reads the TSC, does ITERATIONS `out` instructions to port 0x3000 (each one an exit to
; the VMM's user space: nothing claims that port in either VMM, and QEMU does not coalesce
; it the way it batches POST codes on port 0x80), reads the TSC again and prints "iterations=N cycles=C" on COM1, then exits through
; isa-debug-exit with status (0x27 << 1) | 1.
bits 32
org 0x100000
%include "com1.inc"

%ifndef ITERATIONS
%define ITERATIONS 100000
%endif

%define MB_MAGIC 0x1badb002
%define MB_FLAGS 0x00010000        ; a.out kludge: addresses below are valid

header:
    dd MB_MAGIC
    dd MB_FLAGS
    dd -(MB_MAGIC + MB_FLAGS)
    dd header                       ; header_addr
    dd header                       ; load_addr
    dd image_end                    ; load_end_addr
    dd bss_end                      ; bss_end_addr
    dd start                        ; entry_addr

start:
    mov esp, 0x80000
    mov esi, hello
    call puts
    rdtsc
    mov [t0], eax
    mov [t0 + 4], edx
    mov ecx, ITERATIONS
    mov dx, 0x3000
.loop:
    out dx, al
    dec ecx
    jnz .loop
    rdtsc
    sub eax, [t0]
    sbb edx, [t0 + 4]
    mov [dt], eax
    mov [dt + 4], edx
    mov esi, s_iter
    call puts
    mov eax, ITERATIONS
    call puthex
    mov esi, s_cycles
    call puts
    mov eax, [dt + 4]
    call puthex
    mov eax, [dt]
    call puthex
    mov al, 10
    call putc
    EXIT_WITH 0x27

; puthex: EAX as 8 hex digits
puthex:
    mov ecx, 8
    mov ebx, eax
.digit:
    rol ebx, 4
    mov al, bl
    and al, 0x0f
    add al, '0'
    cmp al, '9'
    jbe .print
    add al, 'a' - '9' - 1
.print:
    call putc
    loop .digit
    ret

DEFINE_PUTC
DEFINE_PUTS

hello: db "pio-loop start", 10, 0
s_iter: db "iterations=0x", 0
s_cycles: db " cycles=0x", 0
align 8
t0: dq 0
dt: dq 0
image_end:
bss_end:
