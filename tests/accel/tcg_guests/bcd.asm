; BCD adjusts (DAA, DAS, AAA, AAS, AAM, AAD) over a sweep of operands, with only the flags
; each defines (DAA/DAS: CF AF SF ZF PF; AAA/AAS: CF AF; AAM/AAD: SF ZF PF), folded into
; a checksum per instruction; AAM 0 is #DE. (Not in the KVM parity set: kvm_pvm cannot
; run DAA.)
%define EXIT_CODE 0x4a
%include "lib.inc"

; SWEEP name, setup-insn-count: for AL in 0..255 and CF/AF in/out, run the body (%2),
; fold AX and the masked flags into EBX
%macro SWEEP 3
    xor ebx, ebx
    xor ecx, ecx
%%loop:
    mov eax, ecx
    and eax, 0x3ff                  ; AL = low byte, bit 8/9 choose CF/AF in
    push eax
    mov edx, eax
    shr edx, 8                      ; bit 0 -> CF, bit 1 -> AF
    and edx, 1
    mov esi, eax
    shr esi, 9
    and esi, 1
    shl esi, 4
    or edx, esi
    pushfd
    and dword [esp], ~0x11
    or [esp], edx
    popfd
    pop eax
    mov ah, cl                      ; AH varies too
    xor ah, 0x5a
    %2
    pushfd
    pop edx
    and edx, %3
    rol ebx, 3
    movzx eax, ax
    add ebx, eax
    add ebx, edx
    inc ecx
    cmp ecx, 0x400
    jne %%loop
    SHOW %1, ebx
%endmacro

main:
    SWEEP "daa", daa, 0xd5
    SWEEP "das", das, 0xd5
    call nl
    SWEEP "aaa", aaa, 0x11
    SWEEP "aas", aas, 0x11
    call nl
    SWEEP "aam", aam, 0xc4
    SWEEP "aam7", {aam 7}, 0xc4
    SWEEP "aad", aad, 0xc4
    SWEEP "aad3", {aad 3}, 0xc4
    call nl
    RESUME .de
    aam 0
.de:
    ret
END_IMAGE
