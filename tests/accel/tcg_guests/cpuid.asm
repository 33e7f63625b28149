; CPUID and the TSC, only what both a Pentium-class CPU and QEMU's qemu32 model promise:
; EFLAGS.ID and AC toggle (CPUID present, 486+), the vendor string, the DE/PSE/TSC/MSR/
; CX8/CMOV feature bits, RDTSC counting up, RDMSR 0x10 = the TSC,
; CR4.TSD making RDTSC a #GP at ring 3 (and not at ring 0), CMPXCHG8B.
%define EXIT_CODE 0x49
%include "lib.inc"

main:
    PRINT `flags\n`
    pushfd
    pop eax
    mov ebx, eax
    xor eax, 0x240000               ; ID and AC
    push eax
    popfd
    pushfd
    pop eax
    xor eax, ebx
    SHOW "toggled", eax
    push ebx
    popfd
    call nl

    PRINT `cpuid\n`
    xor eax, eax
    cpuid
    mov [vendor], ebx
    mov [vendor + 4], edx
    mov [vendor + 8], ecx
    mov esi, vendor
    call puts
    call sp_
    cmp eax, 1
    setae al
    movzx eax, al
    SHOW "leaf1", eax
    mov eax, 1
    cpuid
    and edx, 0x813c
    SHOW "edx", edx
    call nl

    PRINT `tsc\n`
    rdtsc
    mov esi, eax
    mov edi, edx
    mov ecx, 1000
.spin:
    loop .spin
    rdtsc
    sub eax, esi
    sbb edx, edi
    ; later - earlier > 0
    or eax, edx
    setnz al
    movzx eax, al
    SHOW "advances", eax
    mov ecx, 0x10
    rdmsr
    mov esi, eax
    mov edi, edx
    rdtsc
    sub eax, esi
    sbb edx, edi
    setnc al
    movzx eax, al
    SHOW "rdmsr<=rdtsc", eax
    ; (WRMSR 0x10 sets the TSC on hardware and in boite; QEMU TCG ignores it: not compared)
    call nl

    PRINT `tsd\n`
    mov eax, cr4
    or eax, 4                       ; TSD
    mov cr4, eax
    mov eax, cr4
    and eax, 4
    SHOW "cr4.tsd", eax
    rdtsc                           ; ring 0: fine
    call nl
    mov eax, user
    mov edx, 0x002
    call enter_user
    mov eax, cr4
    and eax, ~4
    mov cr4, eax

    PRINT `cmpxchg8b\n`
    mov dword [q], 0x11111111
    mov dword [q + 4], 0x22222222
    mov eax, 0x11111111
    mov edx, 0x22222222
    mov ebx, 0x33333333
    mov ecx, 0x44444444
    lock cmpxchg8b [q]
    pushfd
    and dword [esp], 0x40
    pop eax
    SHOW "zf", eax
    SHOW "lo", [q]
    SHOW "hi", [q + 4]
    xor eax, eax
    xor edx, edx
    cmpxchg8b [q]                   ; differs: EDX:EAX loaded
    SHOW "eax", eax
    SHOW "edx", edx
    call nl
    ret

user:
    RESUME .u1
    rdtsc
.u1:
    int 0x80

align 4
vendor: times 13 db 0
align 8
q: dq 0
END_IMAGE
