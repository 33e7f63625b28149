; Linux's halt without ACPI, in miniature: every vCPU ends in `cli; hlt`. With the
; in-kernel APIC the HLT never exits to the VMM; boite must still see the machine is dead.
bits 32
org 0x100000
%include "com1.inc"

start:
    mov eax, 1
    cpuid
    shr ebx, 24
    test ebx, ebx
    jnz .park                       ; only vCPU 0 prints
    mov al, 'h'
    call putc
.park:
    cli
    hlt
    jmp .park

DEFINE_PUTC
