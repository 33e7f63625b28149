; SYSENTER/SYSEXIT and the MSRs around them: IA32_SYSENTER_CS/ESP/EIP read back as
; written, SYSENTER from ring 3 to the flat ring-0 segments derived from SYSENTER_CS with
; IF cleared, SYSEXIT back to ring 3 at EDX with ESP = ECX, #GP(0) for SYSENTER with a
; null SYSENTER_CS and for SYSEXIT at ring 3; PAT read and written back.
%define EXIT_CODE 0x61
%include "lib.inc"

%define KSTACK2 0x380000

main:
    PRINT `msrs\n`
    mov ecx, 0x174
    xor edx, edx
    mov eax, SEL_KCODE
    wrmsr
    mov ecx, 0x175
    mov eax, KSTACK2
    wrmsr
    mov ecx, 0x176
    mov eax, entry
    wrmsr
    mov ecx, 0x174
    rdmsr
    SHOW "cs", eax
    mov ecx, 0x175
    rdmsr
    SHOW "esp", eax
    mov ecx, 0x176
    rdmsr
    sub eax, entry
    SHOW "eip-entry", eax
    mov ecx, 0x277
    rdmsr
    SHOW "pat.lo", eax
    SHOW "pat.hi", edx
    mov eax, 0x00070106
    mov edx, 0x00050406
    wrmsr
    rdmsr
    SHOW "pat.lo", eax
    SHOW "pat.hi", edx
    call nl

    PRINT `sysenter\n`
    mov eax, user
    mov edx, 0x202                  ; IF set in ring 3: SYSENTER clears it
    call enter_user
    mov eax, [seen_cs]
    SHOW "cs", eax
    mov eax, [seen_ss]
    SHOW "ss", eax
    mov eax, [seen_esp]
    SHOW "esp", eax
    mov eax, [seen_flags]
    and eax, 0x200
    SHOW "if", eax
    mov eax, [seen_ecx]
    SHOW "ecx", eax
    call nl
    mov eax, [user_cs]
    SHOW "ucs", eax
    mov eax, [user_ss]
    SHOW "uss", eax
    mov eax, [user_esp]
    SHOW "uesp", eax
    mov eax, [user_exc]
    SHOW "sysexit@3", eax
    call nl

    PRINT `null cs\n`
    mov ecx, 0x174
    xor eax, eax
    xor edx, edx
    wrmsr
    RESUME .n1
    sysenter                        ; #GP(0)
.n1:
    call nl
    ret

entry:                              ; ring 0, from SYSENTER
    mov [seen_ecx], ecx
    mov [seen_esp], esp
    mov ax, cs
    movzx eax, ax
    mov [seen_cs], eax
    mov ax, ss
    movzx eax, ax
    mov [seen_ss], eax
    pushfd
    pop eax
    mov [seen_flags], eax
    mov ax, SEL_UDATA
    mov ds, ax
    mov es, ax
    mov edx, user.back
    mov ecx, USTACK - 64
    sysexit

user:
    mov ecx, 0x1234
    sysenter
.back:
    mov ax, cs
    movzx eax, ax
    mov [user_cs], eax
    mov ax, ss
    movzx eax, ax
    mov [user_ss], eax
    mov [user_esp], esp
    mov dword [hook + 13 * 4], user_gp
    sysexit                         ; ring 3: #GP(0)
.after:
    int 0x80

user_gp:                            ; #GP hook (runs at ring 0): note it, back to .after
    mov dword [hook + 13 * 4], 0
    mov dword [user_exc], 0xd
    mov eax, [esp + 4]
    or [user_exc], eax              ; error code (0)
    mov dword [esp + 8], user.after
    add esp, 8
    iret

align 4
seen_cs: dd 0
seen_ss: dd 0
seen_esp: dd 0
seen_flags: dd 0
seen_ecx: dd 0
user_cs: dd 0
user_ss: dd 0
user_esp: dd 0
user_exc: dd 0

END_IMAGE
