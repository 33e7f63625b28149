; Descriptor tables from the guest's side: SGDT/SIDT/SLDT/STR, an LDT (LLDT, a data
; segment through a TI=1 selector with its own base, #GP for an LDT selector after LLDT
; of a null selector), LAR/LSL/VERR/VERW on valid, invalid and privileged selectors, ARPL, and the
; accessed bit the CPU sets in a descriptor on load.
%define EXIT_CODE 0x4f
%include "lib.inc"

%define SEL_LDT     0x30            ; GDT: the LDT descriptor
%define SEL_DPL3RO  0x38            ; GDT: DPL 3 read-only data, not yet accessed
%define LSEL_DATA   0x04 | 0x0c     ; LDT entry 1, TI=1, RPL 0: data based at 0x300000

main:
    mov dword [gdt + SEL_DPL3RO], 0x0000FFFF
    mov dword [gdt + SEL_DPL3RO + 4], 0x00CFF000
    ; LDT: entry 0 null, entry 1 data base 0x300000 limit 0xfffff bytes
    mov dword [ldt + 8], 0x0000FFFF
    mov dword [ldt + 12], 0x004F9230
    mov eax, ldt
    mov word [gdt + SEL_LDT], 15
    mov [gdt + SEL_LDT + 2], ax
    shr eax, 16
    mov [gdt + SEL_LDT + 4], al
    mov [gdt + SEL_LDT + 7], ah
    mov byte [gdt + SEL_LDT + 5], 0x82          ; present, LDT

    PRINT `tables\n`
    sgdt [tbuf]
    movzx eax, word [tbuf]
    SHOW "gdt limit", eax
    mov eax, [tbuf + 2]
    sub eax, gdt
    SHOW "gdt base-gdt", eax
    sidt [tbuf]
    movzx eax, word [tbuf]
    SHOW "idt limit", eax
    str ax
    movzx eax, ax
    SHOW "tr", eax
    sldt ax
    movzx eax, ax
    SHOW "ldtr", eax
    call nl

    PRINT `ldt\n`
    mov dword [0x300040], 0x1d71d7
    mov ax, SEL_LDT
    lldt ax
    sldt ax
    movzx eax, ax
    SHOW "ldtr", eax
    mov ax, LSEL_DATA
    mov es, ax
    mov eax, [es:0x40]
    SHOW "via ldt", eax
    mov eax, [ldt + 12]
    and eax, 0x100
    SHOW "accessed", eax
    call nl
    mov ax, SEL_KDATA
    mov es, ax
    xor eax, eax
    lldt ax                         ; a null LDT: LDT selectors fault from now on
    mov ax, LSEL_DATA
    RESUME .noldt
    mov es, ax                      ; #GP(sel)
.noldt:

    PRINT `lar lsl verr verw\n`
    mov esi, sels
.sel:
    movzx ebx, word [esi]
    cmp ebx, 0xffff
    je .seldone
    mov eax, ebx
    call hex16
    call sp_
    xor eax, eax
    lar eax, ebx
    pushfd
    and eax, 0x00f0ff00             ; type, S, DPL, P, AVL, D/B, G
    call hex32
    pop eax
    and eax, 0x40
    call hex8
    call sp_
    xor eax, eax
    lsl eax, ebx
    pushfd
    call hex32
    pop eax
    and eax, 0x40
    call hex8
    call sp_
    verr bx
    pushfd
    pop eax
    and eax, 0x40
    call hex8
    verw bx
    pushfd
    pop eax
    and eax, 0x40
    call sp_
    call hex8
    call nl
    add esi, 2
    jmp .sel
.seldone:
    mov eax, [gdt + SEL_DPL3RO + 4]
    and eax, 0x100
    SHOW "untouched", eax           ; LAR/LSL/VERR/VERW do not set the accessed bit

    PRINT "arpl "
    mov ax, 0x10
    mov bx, 0x1b
    arpl ax, bx                     ; RPL raised to 3, ZF=1
    pushfd
    movzx eax, ax
    call hex16
    call sp_
    pop eax
    and eax, 0x40
    call hex8
    call nl
    ret

align 4
; selectors probed: null, code, data, TSS (system), LDT, DPL 3 ro data, beyond the GDT
sels: dw 0, SEL_KCODE, SEL_KDATA, SEL_TSS, SEL_LDT, SEL_DPL3RO | 3, 0x1b, 0x78, 0x80, 0xffff
tbuf: times 8 db 0
align 8
ldt: times 2 dq 0
END_IMAGE
