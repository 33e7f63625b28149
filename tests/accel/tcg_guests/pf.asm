; #PF error codes and CR2: not-present read/write/fetch, not-present PDE, read-only with
; CR0.WP at ring 0, an access that straddles into a not-present page, REP MOVSD stopped
; at a page boundary (ECX/ESI/EDI where it stopped), and from ring 3: supervisor pages (4 KiB and PSE), read-only pages, U/S and R/W combined
; from PDE and PTE.
%define EXIT_CODE 0x43
%include "lib.inc"

%define PD      0x200000
%define PT0     0x201000            ; identity 0..4 MiB, user
%define PT1     0x202000            ; window at 0x40000000, user PDE
%define PT2     0x203000            ; window at 0x40400000, supervisor PDE
%define PT3     0x204000            ; window at 0x40800000, read-only PDE
%define WIN     0x40000000

main:
    mov edi, PD
    xor eax, eax
    mov ecx, 5 * 1024
    rep stosd
    mov edi, PT0
    mov eax, 0x007
    mov ecx, 1024
.id:
    stosd
    add eax, 0x1000
    loop .id
    mov dword [PD + 0 * 4], PT0 | 7
    mov dword [PD + 1 * 4], 0x400000 | 0x83     ; PSE, supervisor
    mov dword [PD + 2 * 4], 0x400000 | 0x85     ; PSE, user, read-only
    mov dword [PD + 0x100 * 4], PT1 | 7
    mov dword [PD + 0x101 * 4], PT2 | 3         ; supervisor PDE over a user PTE
    mov dword [PD + 0x102 * 4], PT3 | 5         ; read-only PDE over a writable PTE
    mov dword [PT1 + 0 * 4], 0x300000 | 7       ; user rw
    mov dword [PT1 + 1 * 4], 0x301000 | 5       ; user ro
    mov dword [PT1 + 2 * 4], 0x302000 | 3       ; supervisor rw
    ; PT1[3] not present
    mov dword [PT1 + 4 * 4], 0x303000 | 7
    mov dword [PT2 + 0 * 4], 0x304000 | 7
    mov dword [PT3 + 0 * 4], 0x305000 | 7
    mov eax, cr4
    or eax, 0x10
    mov cr4, eax
    mov eax, PD
    mov cr3, eax
    mov eax, cr0
    or eax, 0x80010000                          ; PG | WP
    mov cr0, eax
    jmp .paged
.paged:
    PRINT `ring 0\n`
    RESUME .k1
    mov eax, [WIN + 0x3010]         ; not present, read: 0
.k1:
    RESUME .k2
    mov dword [WIN + 0x3020], 1     ; not present, write: 2
.k2:
    RESUME .k3
    mov eax, [0x80000000]           ; not-present PDE: 0
.k3:
    RESUME .k4
    mov dword [WIN + 0x1000], 1     ; read-only with WP: 3
.k4:
    RESUME .k5
    mov eax, [WIN + 0x2ffe]         ; straddles into the not-present page: CR2 = its start
.k5:
    RESUME .k6
    mov eax, WIN + 0x3000
    call eax                        ; fetch from a not-present page
.k6:
    add esp, 4                      ; the return address CALL pushed
    mov esi, 0x100000
    mov edi, WIN + 0x2ff0
    mov ecx, 16
    RESUME .k7
    rep movsd                       ; stops at the not-present page
.k7:
    SHOW "ecx", ecx
    mov eax, esi
    sub eax, 0x100000
    SHOW "esi+", eax
    SHOW "edi", edi
    call nl
    mov eax, cr2
    SHOW "cr2", eax
    call nl

    ; warm the TLB at ring 0 with every page ring 3 is about to try: supervisor pages,
    ; and the read-only page written with WP=0, so the user checks cannot come from a
    ; ring-0 translation
    mov eax, [WIN + 0x2000]
    mov eax, [0x400000]
    mov eax, [WIN + 0x400000]
    mov eax, cr0
    and eax, ~0x10000
    mov cr0, eax
    mov dword [WIN + 0x1000], 0x1234
    mov dword [0x800000], 0x5678
    mov dword [WIN + 0x800000], 0x9abc
    or eax, 0x10000
    mov cr0, eax
    PRINT `ring 3\n`
    mov eax, user
    mov edx, 0x002
    call enter_user
    PRINT `back\n`
    RESUME .k9
    mov dword [WIN + 0x1000], 1     ; WP again at ring 0: 3
.k9:
    SHOW "ro", [WIN + 0x1000]
    SHOW "pse ro", [0x800000]
    call nl
    ret

user:
    mov eax, [WIN]                  ; fine
    RESUME .u1
    mov eax, [WIN + 0x2000]         ; supervisor page, read: 5
.u1:
    RESUME .u2
    mov dword [WIN + 0x2000], 1     ; supervisor page, write: 7
.u2:
    RESUME .u3
    mov dword [WIN + 0x1000], 1     ; read-only page: 7
.u3:
    RESUME .u4
    mov eax, [WIN + 0x3000]         ; not present: 4
.u4:
    RESUME .u5
    mov dword [WIN + 0x3000], 1     ; not present, write: 6
.u5:
    RESUME .u6
    mov eax, [0x400000]             ; supervisor PSE page: 5
.u6:
    mov eax, [0x800000]             ; user read-only PSE page: read fine
    RESUME .u7
    mov [0x800000], eax             ; ...write: 7
.u7:
    RESUME .u8
    mov eax, [WIN + 0x400000]       ; supervisor PDE, user PTE: 5
.u8:
    mov eax, [WIN + 0x800000]       ; read-only PDE, writable PTE: read fine
    RESUME .u9
    mov dword [WIN + 0x800000], 1   ; ...write: 7
.u9:
    RESUME .u10
    mov eax, WIN + 0x2000
    jmp eax                         ; fetch from a supervisor page: 5
.u10:
    int 0x80

END_IMAGE
