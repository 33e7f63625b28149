; 2-level paging: 4 KiB pages and PSE 4 MiB pages, accessed/dirty bits set by the CPU in
; PDEs and PTEs (and D set on the first write after a read filled the TLB), CR0.WP at
; ring 0, INVLPG and CR3 reloads making a changed PTE visible, paging turned off again.
%define EXIT_CODE 0x42
%include "lib.inc"

%define PD      0x200000
%define PT0     0x201000            ; identity 0..4 MiB
%define PT1     0x202000            ; the window at 0x40000000
%define WIN     0x40000000
%define FRAME_A 0x300000
%define FRAME_B 0x301000
%define FRAME_C 0x302000

main:
    ; frames with known contents
    mov dword [FRAME_A], 0xaaaa0000
    mov dword [FRAME_B], 0xbbbb0000
    mov dword [FRAME_C], 0xcccc0000
    mov dword [0x400010], 0x4d4d4d4d
    ; page directory and tables, A/D clear everywhere
    mov edi, PD
    xor eax, eax
    mov ecx, 3 * 1024
    rep stosd
    mov edi, PT0
    mov eax, 0x003                  ; present | writable
    mov ecx, 1024
.id:
    stosd
    add eax, 0x1000
    loop .id
    mov dword [PD + 0 * 4], PT0 | 3
    mov dword [PD + 1 * 4], 0x400000 | 0x83     ; PSE: 4 MiB at 4 MiB
    mov dword [PD + 2 * 4], 0x400000 | 0x83     ; ...and again at 8 MiB
    mov dword [PD + 0x100 * 4], PT1 | 3
    mov dword [PT1 + 0 * 4], FRAME_A | 3
    mov dword [PT1 + 1 * 4], FRAME_B | 3
    mov dword [PT1 + 2 * 4], FRAME_A | 3        ; alias of page 0
    mov dword [PT1 + 3 * 4], FRAME_C | 1        ; read-only
    mov eax, cr4
    or eax, 0x10                                ; PSE
    mov cr4, eax
    mov eax, PD
    mov cr3, eax
    mov eax, cr0
    or eax, 0x80000000                          ; PG, WP still off
    mov cr0, eax
    jmp .paged
.paged:
    PRINT `4K pages\n`
    mov eax, [WIN]
    SHOW "read", eax
    mov eax, [PT1]
    and eax, 0x60
    SHOW "pte0.AD", eax
    mov eax, [PD + 0x100 * 4]
    and eax, 0x20
    SHOW "pde.A", eax
    call nl
    mov dword [WIN + 0x1004], 0x12345678
    mov eax, [PT1 + 4]
    and eax, 0x60
    SHOW "pte1.AD", eax
    mov eax, [FRAME_B + 4]
    SHOW "frameB+4", eax
    call nl
    mov dword [WIN + 0x2008], 0x600d
    mov eax, [WIN + 8]
    SHOW "alias", eax
    mov eax, [PT1 + 8]
    and eax, 0x60
    SHOW "pte2.AD", eax
    mov eax, [PT1]
    and eax, 0x60
    SHOW "pte0.AD", eax
    call nl
    ; D after a read: the first write must set D though the TLB holds the page
    mov eax, [WIN + 0x1000]         ; page 1 again (A, D set already); use page 0's alias
    and dword [PT1 + 0], ~0x60      ; clear A/D of page 0
    invlpg [WIN]
    mov eax, [WIN]
    mov eax, [PT1]
    and eax, 0x60
    SHOW "after read", eax
    mov byte [WIN + 1], 0x55
    mov eax, [PT1]
    and eax, 0x60
    SHOW "after write", eax
    call nl

    PRINT `PSE\n`
    mov eax, [0x400010]
    SHOW "read", eax
    mov eax, [PD + 4]
    and eax, 0xe0
    SHOW "pde1", eax
    mov dword [0x400014], 0x5e5e5e5e
    mov eax, [PD + 4]
    and eax, 0xe0
    SHOW "pde1", eax
    mov eax, [0x800014]             ; the second 4 MiB mapping of the same frame
    SHOW "alias", eax
    mov eax, [PD + 8]
    and eax, 0xe0
    SHOW "pde2", eax
    call nl

    ; CR4.PSE off: the same PDE's PS bit is ignored, so it names a page table (at 4 MiB)
    mov dword [0x400000], FRAME_A | 3   ; its PTE 0 (through the identity map)
    mov dword [FRAME_A + 0x10], 0x0f0f0f0f
    mov eax, cr4
    and eax, ~0x10
    mov cr4, eax
    mov eax, cr3
    mov cr3, eax
    mov eax, [0x400010]
    SHOW "pse off", eax
    mov eax, cr4
    or eax, 0x10
    mov cr4, eax
    mov eax, cr3
    mov cr3, eax
    mov eax, [0x400010]
    SHOW "pse on", eax
    call nl

    PRINT `WP\n`
    mov dword [WIN + 0x3000], 0x77  ; WP=0: ring 0 writes a read-only page
    mov eax, [FRAME_C]
    SHOW "wp0 write", eax
    mov eax, [PT1 + 12]
    and eax, 0x63
    SHOW "pte3", eax
    call nl
    mov eax, cr0
    or eax, 0x10000                 ; WP
    mov cr0, eax
    RESUME .wp1
    mov dword [WIN + 0x3000], 0x88  ; now a #PF with error 3
.wp1:
    mov eax, [FRAME_C]
    SHOW "wp1 kept", eax
    call nl

    PRINT `INVLPG and CR3\n`
    mov dword [PT1], FRAME_B | 3    ; page 0 -> frame B
    invlpg [WIN]
    mov eax, [WIN]
    SHOW "invlpg", eax
    mov dword [PT1], FRAME_C | 3    ; page 0 -> frame C
    mov eax, cr3
    mov cr3, eax
    mov eax, [WIN]
    SHOW "cr3", eax
    call nl
    mov dword [PT1], 0              ; not present
    invlpg [WIN + 0x123]            ; any address inside the page
    RESUME .np
    mov eax, [WIN + 0x10]
.np:
    ; a second page directory (same tables but page 0 -> frame A), switched by CR3
    mov esi, PD
    mov edi, 0x203000
    mov ecx, 1024
    rep movsd
    mov esi, PT1
    mov edi, 0x204000
    mov ecx, 1024
    rep movsd
    mov dword [0x204000], FRAME_A | 3
    mov dword [0x203000 + 0x100 * 4], 0x204000 | 3
    mov eax, 0x203000
    mov cr3, eax
    mov eax, [WIN]
    SHOW "pd2", eax
    mov eax, PD
    mov cr3, eax
    RESUME .np2
    mov eax, [WIN]
.np2:
    mov eax, cr3
    SHOW "cr3", eax
    call nl

    PRINT `paging off\n`
    mov eax, cr0
    and eax, 0x7fffffff
    mov cr0, eax
    jmp .flat
.flat:
    mov eax, [0x400014]
    SHOW "phys", eax
    mov eax, [FRAME_A]
    SHOW "frameA", eax
    mov eax, cr0
    SHOW "cr0", eax
    call nl
    ret
END_IMAGE
