; Two vCPUs start here together (flat 32-bit, 1 MiB), each with its local APIC at
; 0xFEE00000 (the same address: each CPU sees its own). vCPU 0 runs its APIC timer
; periodically (vector 0x40) for 5 ticks, EOI after each, then sends a fixed IPI
; (vector 0x41) to APIC id 1, which sleeps in HLT until the IPI's handler counts it.
; vCPU 0 prints "apic: 5 ticks, ipi taken" and exits with (0x2a << 1) | 1.
bits 32
org 0x100000
%include "com1.inc"
%include "apic.inc"


start:
    mov eax, 1
    cpuid
    shr ebx, 24
    mov edi, ebx                        ; APIC id
    mov esp, edi
    shl esp, 12
    neg esp
    add esp, 0x80000
    GATE 0x40, tick
    GATE 0x41, ipi
    lidt [idt_desc]
    mov dword [APIC + 0xf0], 0x1ff      ; SVR: software enable, spurious vector 0xff
    test edi, edi
    jnz ap
    mov dword [APIC + 0x3e0], 0xb       ; divide by 1
    mov dword [APIC + 0x320], 0x20040   ; LVT timer: periodic, vector 0x40
    mov dword [APIC + 0x380], 1000000   ; initial count
    sti
.idle:
    hlt
    cmp dword [ticks], 5
    jb .idle
    mov dword [APIC + 0x320], 0x10000   ; timer masked
.wait_ap:
    pause
    cmp dword [ap_ready], 1
    jne .wait_ap
    mov dword [APIC + 0x310], 1 << 24   ; destination: APIC id 1
    mov dword [APIC + 0x300], 0x41      ; fixed, physical, vector 0x41
.wait_ipi:
    pause
    cmp dword [ipis], 1
    jb .wait_ipi
    cli
    mov esi, msg
    call puts
    EXIT_WITH 0x2a

ap:
    sti
    mov dword [ap_ready], 1
.park:
    hlt
    jmp .park

COUNTING_HANDLER tick, ticks

COUNTING_HANDLER ipi, ipis

DEFINE_PUTC
DEFINE_PUTS

msg: db "apic: 5 ticks, ipi taken", 10, 0
align 4
ticks: dd 0
ipis: dd 0
ap_ready: dd 0
DEFINE_IDT
