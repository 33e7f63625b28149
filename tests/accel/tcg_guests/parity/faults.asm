; Exceptions delivered through the IDT without IRET (kvm_pvm cannot IRET): each handler
; prints vector, error code and EIP and jumps on: #DE, #UD, #GP and #NP on segment loads,
; #GP on a far jump to data. (kvm_pvm cannot run INT3 or BOUND; the TCG suite has them.)
%define EXIT_CODE 0x52
%define NO_IRET
%include "lib.inc"

%define SEL_XONLY   0x30
%define SEL_NPDATA  0x40

main:
    mov dword [gdt + SEL_XONLY], 0x0000FFFF
    mov dword [gdt + SEL_XONLY + 4], 0x00CF9800
    mov dword [gdt + SEL_NPDATA], 0x0000FFFF
    mov dword [gdt + SEL_NPDATA + 4], 0x00CF1200

    mov eax, 0x1234
    xor edx, edx
    xor ecx, ecx
    RESUME .de
    div ecx
.de:
    SHOW "eax", eax
    call nl
    RESUME .ud
    ud2
.ud:
    mov ax, 0x7b
    RESUME .gp1
    mov ds, ax
.gp1:
    mov ax, SEL_XONLY
    RESUME .gp2
    mov es, ax
.gp2:
    xor eax, eax
    RESUME .gp3
    mov ss, ax
.gp3:
    mov ax, SEL_NPDATA
    RESUME .np
    mov es, ax
.np:
    mov ax, SEL_KDATA
    mov es, ax
    mov fs, ax
    mov gs, ax
    RESUME .far
    jmp SEL_KDATA:0                 ; far jump to data: #GP(sel)
.far:
    ret
END_IMAGE
