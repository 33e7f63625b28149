; PAE paging with NX (qemu-cpu: qemu32,+nx): 4 KiB and 2 MiB pages, accessed/dirty bits in the 64-bit entries, reserved bits in
; a PDE/PTE (#PF with RSVD), EFER.NXE making bit 63 the XD bit (a fetch from an XD page is
; #PF with I/D; reading it is fine), XD in the PDE covering its PTEs, a ring-3 fetch from
; an XD user page, and turning NXE off again (bit 63 reserved once more).
; Left out where QEMU TCG departs from the SDM: it clears P in the error code of a
; reserved-bit fault (the SDM sets it: RSVD implies P), so those print err & 0x1e; and it
; does not check the PDPTEs when CR3 is loaded (the SDM's #GP(0); test_emu_pae.py has it).
%define EXIT_CODE 0x60
%include "lib.inc"

%define PDPT    0x200000            ; 32-byte aligned
%define PD0     0x201000            ; 0..1 GiB
%define PD1     0x202000            ; 1..2 GiB: the window
%define PT0     0x203000            ; window 0x40000000..0x401FFFFF in 4 KiB pages
%define WIN     0x40000000
%define FRAME_A 0x300000
%define FRAME_B 0x301000

main:
    mov dword [FRAME_A], 0xaaaa0000
    mov dword [FRAME_B], 0xbbbb0000
    mov byte [FRAME_B + 0x10], 0xc3         ; ret, for fetches
    mov byte [FRAME_A + 0x10], 0xc3
    mov edi, PDPT
    xor eax, eax
    mov ecx, 5 * 1024
    rep stosd
    ; identity map the first 8 MiB with 2 MiB pages (user, writable)
    mov dword [PD0 + 0 * 8], 0x000000 | 0x87
    mov dword [PD0 + 1 * 8], 0x200000 | 0x87
    mov dword [PD0 + 2 * 8], 0x400000 | 0x87
    mov dword [PD0 + 3 * 8], 0x600000 | 0x87
    mov dword [PD1 + 0 * 8], PT0 | 7
    mov dword [PT0 + 0 * 8], FRAME_A | 7
    mov dword [PT0 + 1 * 8], FRAME_B | 7
    mov dword [PT0 + 2 * 8], FRAME_A | 7
    mov dword [PT0 + 2 * 8 + 4], 0x80000000 ; XD: not allowed until NXE
    mov dword [PT0 + 3 * 8], FRAME_B | 7
    mov dword [PT0 + 3 * 8 + 4], 0x00000010 ; bit 36: above MAXPHYADDR
    mov dword [PD1 + 1 * 8], 0x600000 | 0x87 ; 2 MiB page at WIN + 2 MiB
    mov dword [PD1 + 3 * 8], 0x600000 | 0x87 ; and at WIN + 6 MiB, XD once NXE is on
    mov dword [PD1 + 2 * 8], 0x600000 | 0x87 | 0x2000 ; reserved bit 13 of a 2 MiB PDE
    mov dword [PDPT + 0 * 8], PD0 | 1
    mov dword [PDPT + 1 * 8], PD1 | 1

    mov eax, cr4
    or eax, 0x20                            ; PAE
    mov cr4, eax
    mov eax, PDPT
    mov cr3, eax
    mov eax, cr0
    or eax, 0x80000000
    mov cr0, eax
    jmp .paged
.paged:
    PRINT `pae\n`
    mov eax, [WIN]
    SHOW "a", eax
    mov eax, [WIN + 0x1000]
    SHOW "b", eax
    mov dword [WIN + 0x1004], 5
    mov eax, [PT0 + 8]
    and eax, 0x60
    SHOW "pte1.AD", eax
    mov eax, [PT0]
    and eax, 0x60
    SHOW "pte0.AD", eax
    mov eax, [PD1]
    and eax, 0x20
    SHOW "pde.A", eax
    mov eax, [WIN + 0x200000]               ; 2 MiB page
    SHOW "big", eax
    call nl
    PRINT `reserved\n`
    mov dword [hook + 14 * 4], rsvd_pf
    RESUME .r1
    mov eax, [WIN + 0x2000]                 ; bit 63 without NXE: 9
.r1:
    RESUME .r2
    mov eax, [WIN + 0x3000]                 ; bit 36: 9
.r2:
    RESUME .r3
    mov dword [WIN + 0x400000], 1           ; 2 MiB PDE bit 13: b
.r3:
    mov dword [hook + 14 * 4], 0
    call nl

    PRINT `nx\n`
    mov ecx, 0xc0000080
    rdmsr
    SHOW "efer", eax
    or eax, 0x800
    wrmsr
    rdmsr
    SHOW "efer", eax
    mov dword [PD1 + 3 * 8 + 4], 0x80000000
    mov eax, [WIN + 0x2000]                 ; XD page: reading is fine
    SHOW "xd read", eax
    mov eax, WIN + 0x1010
    call eax                                ; executable page: ret
    PRINT "ran "
    RESUME .n1
    mov eax, WIN + 0x2010
    call eax                                ; XD: #PF 0x11
.n1:
    add esp, 4
    RESUME .n2
    mov eax, WIN + 0x600010
    call eax                                ; XD 2 MiB page: 0x11
.n2:
    add esp, 4
    call nl
    PRINT `ring 3\n`
    mov eax, user
    mov edx, 0x002
    call enter_user
    PRINT `back\n`
    ; NXE off: bit 63 is reserved again (the TLB forgets the XD page)
    mov ecx, 0xc0000080
    rdmsr
    and eax, ~0x800
    wrmsr
    mov eax, cr3                            ; the TLB may keep the old translation: flush
    mov cr3, eax
    mov dword [hook + 14 * 4], rsvd_pf
    RESUME .o1
    mov eax, [WIN + 0x2000]
.o1:
    mov dword [hook + 14 * 4], 0
    call nl
    ; paging off, PAE off
    mov eax, cr0
    and eax, 0x7fffffff
    mov cr0, eax
    mov eax, cr4
    and eax, ~0x20
    mov cr4, eax
    ret

; #PF hook for reserved-bit faults: prints the error code without P, and CR2.
rsvd_pf:
    push eax
    mov eax, [esp + 8]
    and eax, 0x1e
    SHOW "pf", eax
    mov eax, cr2
    SHOW "cr2", eax
    mov eax, [resume]
    mov [esp + 12], eax
    mov dword [resume], 0
    pop eax
    add esp, 8
    iret

user:
    mov eax, [WIN + 0x2000]                 ; user read of an XD page
    RESUME .u1
    mov eax, WIN + 0x2010
    call eax                                ; user fetch from XD: 0x15
.u1:
    add esp, 4
    int 0x80

END_IMAGE
