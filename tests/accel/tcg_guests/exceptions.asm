; Faults and traps without paging: #DE (divide by zero, quotient overflow), #UD, #BP and
; INTO (traps: EIP after the instruction), BOUND, #GP with selector error codes (beyond
; the GDT, wrong type, wrong privilege, null SS, far jump to data), #NM for x87
; instructions with CR0.TS or EM (and WAIT with MP+TS), CLTS, #NP and #SS for
; not-present segments, #NP for a not-present IDT gate, and that the faulting
; instruction left the registers as they were.
%define EXIT_CODE 0x41
%include "lib.inc"

; test descriptors (see gdt_test in lib.inc)
%define SEL_XONLY   0x30            ; execute-only code
%define SEL_RODATA  0x38            ; read-only data
%define SEL_NPDATA  0x40            ; not-present data
%define SEL_DPL3    0x48            ; DPL 3 data (as SS at CPL 0: #GP)

main:
    mov dword [gdt + SEL_XONLY], 0x0000FFFF
    mov dword [gdt + SEL_XONLY + 4], 0x00CF9800
    mov dword [gdt + SEL_RODATA], 0x0000FFFF
    mov dword [gdt + SEL_RODATA + 4], 0x00CF9000
    mov dword [gdt + SEL_NPDATA], 0x0000FFFF
    mov dword [gdt + SEL_NPDATA + 4], 0x00CF1200
    mov dword [gdt + SEL_DPL3], 0x0000FFFF
    mov dword [gdt + SEL_DPL3 + 4], 0x00CFF200

    PRINT `#DE\n`
    mov eax, 0x1234
    mov edx, 0
    mov ecx, 0
    RESUME .de1
    div ecx
.de1:
    SHOW "eax", eax
    SHOW "edx", edx
    call nl
    mov eax, 0x80000000
    mov edx, 0xffffffff
    mov ecx, -1
    RESUME .de2
    idiv ecx                        ; -2^31 / -1 overflows
.de2:
    mov ax, 0x1000
    mov bl, 2
    RESUME .de3
    div bl                          ; 0x800 does not fit AL
.de3:
    mov ax, 0x8000
    mov bl, 0xff
    RESUME .de4
    idiv bl                         ; -32768 / -1
.de4:
    SHOW "eax", eax
    call nl

    PRINT `#UD\n`
    RESUME .ud1
    ud2
.ud1:
    RESUME .ud2
    db 0xf0, 0x01, 0xd8             ; lock add eax, ebx: LOCK needs a memory operand
.ud2:
    RESUME .ud3
    db 0x8d, 0xc3                   ; lea eax, ebx
.ud3:
    RESUME .ud4
    db 0x8e, 0xc8                   ; mov cs, ax
.ud4:
    RESUME .ud5
    db 0xf0, 0x90                   ; lock nop
.ud5:

    PRINT `#BP #OF #BR\n`
    RESUME .bp1
    int3                            ; trap: EIP after the instruction
.bp1:
    RESUME .bp2
    int 3
.bp2:
    mov al, 0x7f
    add al, 1                       ; OF = 1
    RESUME .of1
    into
.of1:
    mov al, 0
    add al, 1                       ; OF = 0: INTO does nothing
    into
    mov eax, 20
    RESUME .br1
    bound eax, [bounds]             ; 20 outside [5, 10]: fault
.br1:
    mov eax, 7
    bound eax, [bounds]             ; inside: nothing

    PRINT `#GP\n`
    mov ax, 0x7b                    ; beyond the GDT limit: error = selector & ~3
    RESUME .gp1
    mov ds, ax
.gp1:
    mov ax, SEL_XONLY               ; execute-only code is no data segment
    RESUME .gp2
    mov es, ax
.gp2:
    mov ax, SEL_RODATA              ; SS must be writable
    RESUME .gp3
    mov ss, ax
.gp3:
    xor eax, eax                    ; null SS at CPL 0: #GP(0)
    RESUME .gp4
    mov ss, ax
.gp4:
    mov ax, SEL_DPL3                ; SS DPL must equal CPL
    RESUME .gp5
    mov ss, ax
.gp5:
    ; (writes through a read-only segment, accesses beyond a segment limit or through a
    ; null selector fault on hardware, but QEMU TCG does not check data segments: those
    ; are compared against the real CPU in test_emu_kvm_diff, not here)
    RESUME .gp9
    jmp SEL_KDATA:0                 ; far jump to a data segment: #GP(sel)
.gp9:
    ; (CR0.PG without PE is #GP on hardware, but QEMU TCG takes it: not compared)
    mov eax, cr0
    SHOW "cr0", eax
    call nl
    PRINT `#NM\n`
    mov eax, cr0
    or eax, 8                       ; TS: the next x87 instruction faults
    mov cr0, eax
    RESUME .nm1
    fninit
.nm1:
    RESUME .nm2
    fld1
.nm2:
    or eax, 2                       ; MP too: WAIT faults as well
    mov cr0, eax
    RESUME .nm3
    fwait
.nm3:
    clts
    mov eax, cr0
    and eax, 0xe
    SHOW "cr0 after clts", eax
    call nl
    mov eax, cr0
    and eax, ~0xe
    or eax, 4                       ; EM: x87 instructions fault without TS
    mov cr0, eax
    RESUME .nm4
    fninit
.nm4:
    and eax, ~4
    mov cr0, eax

    PRINT `#NP #SS\n`
    mov [saved_ds], ds
    mov ax, SEL_NPDATA
    RESUME .np1
    mov ds, ax                      ; #NP(sel)
.np1:
    RESUME .np2
    mov ss, ax                      ; not-present SS: #SS(sel)
.np2:
    mov ecx, 0x33                   ; a not-present gate: #NP(vector * 8 + 2)
    mov eax, stubs + 0x33 * 16
    mov edx, 0x0e00
    call set_gate
    RESUME .np3
    int 0x33
.np3:
    movzx eax, word [saved_ds]
    SHOW "ds", eax
    call nl
    ret

align 4
bounds: dd 5, 10
saved_ds: dd 0
END_IMAGE
