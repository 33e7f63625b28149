; Translated code must follow every change of what an address holds (the native tier's
; invalidation, issue 11; smc.asm has the same-page cases): a hot function whose
; instruction straddles two pages, rewritten on its second page; a hot function on one
; page rewritten by a loop on another; a linear code page remapped to another physical
; page (PTE rewrite + INVLPG, and two page directories swapped through CR3); a remapped
; page's old frame rewritten (translations are of physical pages); CR0.PG toggled under a
; hot call whose linear address means another frame when paging is on; CR0.WP toggled
; under a hot ring-0 store to a read-only page; CR4.PSE toggled so that one PDE maps a
; 4 MiB page or points at a page table; CR4.PAE toggled (through PG off) between tables
; that map one page differently. Every function is called often enough to be
; translated before it changes, and every sum is compared with QEMU TCG. A page written as
; data by hot code, then run, then rewritten (a loader's pattern) is there too.
%define EXIT_CODE 0x62
%include "lib.inc"

%define PD      0x200000
%define PT0     0x201000            ; identity 0..4 MiB (one entry remapped, one read-only)
%define PT1     0x202000            ; the window at WIN
%define PD2     0x203000            ; PD with the window through PT2
%define PT2     0x204000
%define WIN     0x40000000
%define XP      0x310ffd            ; mov eax, imm32 / ret with the imm32 across 0x311000
%define OTHER   0x313000            ; a hot function on a page of its own
%define F1      0x320000
%define F2      0x321000
%define F3      0x322000
%define PGLIN   0x330000            ; PG off: this frame; PG on: mapped to F2
%define ROPAGE  0x340000            ; read-only in PT0
%define PDPT    0x205000            ; PAE: one PDPTE, identity 0..4 MiB in 2 MiB pages
%define PAE_PD  0x206000
%define JITPG   0x350000            ; data written by a hot loop, then code, then rewritten
%define BIG     0x400000            ; PSE: the 4 MiB frame of PDE 2; no PSE: its page table
%define PSELIN  0x801000

main:
    ; functions: mov eax, imm32; ret (B8 imm32 C3)
    mov edi, XP
    mov eax, 0x01020304
    call put_func
    mov edi, OTHER
    mov eax, 7
    call put_func
    mov edi, F1
    mov eax, 0x1111
    call put_func
    mov edi, F2
    mov eax, 0x2222
    call put_func
    mov edi, F3
    mov eax, 0x1111
    call put_func
    mov edi, PGLIN
    mov eax, 0x3333
    call put_func
    mov edi, BIG + 0x1000
    mov eax, 0x4444
    call put_func
    mov edi, BIG + 0x3000
    mov eax, 0x5555
    call put_func
    mov dword [F1 + 0x800], 0x10    ; data beside each function, read through the same
    mov dword [F2 + 0x800], 0x20    ; linear page right after the call (in a block of
    mov dword [F3 + 0x800], 0x30    ; its own: the data side of the translated code)
    mov dword [PGLIN + 0x800], 0x40
    mov dword [BIG + 0x1800], 0x50
    mov dword [BIG + 0x3800], 0x60
    mov dword [BIG], 0
    mov dword [BIG + 4], (BIG + 0x3000) | 3     ; PTE 1 when PDE 2 is a page table

    PRINT `straddling\n`
    xor ebx, ebx
    mov ecx, 64
.xp:
    call XP
    add ebx, eax
    test ecx, 15
    jnz .xp_same
    mov [0x311000], cl              ; the imm32's third byte, on the second page
.xp_same:
    loop .xp
    SHOW "sum", ebx
    call nl

    PRINT `other page\n`
    xor ebx, ebx
    mov ecx, 64
.op:
    call OTHER
    add ebx, eax
    test ecx, 7
    jnz .op_same
    mov [OTHER + 1], ecx
.op_same:
    loop .op
    SHOW "sum", ebx
    call nl

    PRINT `written code\n`
    mov edi, JITPG
    mov ecx, 64
.fill:                              ; hot stores to the page while it holds no code
    mov [edi + ecx * 4], ecx
    loop .fill
    xor ebx, ebx
    mov ecx, 40
.wr:                                ; then a function written there, run, rewritten
    mov edi, JITPG
    mov eax, ecx
    call put_func
    mov edx, JITPG
    call edx
    add ebx, eax
    add ebx, [JITPG + 0x80]
    loop .wr
    SHOW "sum", ebx
    call nl

    ; paging: identity 0..4 MiB, the window through PT1, PDE 2 for the PSE case
    mov edi, PD
    xor eax, eax
    mov ecx, 5 * 1024
    rep stosd
    mov edi, PT0
    mov eax, 3
    mov ecx, 1024
.id:
    stosd
    add eax, 0x1000
    loop .id
    mov dword [PT0 + (PGLIN >> 12) * 4], F2 | 3
    mov dword [PT0 + (ROPAGE >> 12) * 4], ROPAGE | 1
    mov dword [PD], PT0 | 3
    mov dword [PD + 2 * 4], BIG | 0x83
    mov dword [PD + (WIN >> 22) * 4], PT1 | 3
    mov dword [PT1], F1 | 3
    mov esi, PD
    mov edi, PD2
    mov ecx, 1024
    rep movsd
    mov dword [PD2 + (WIN >> 22) * 4], PT2 | 3
    mov dword [PT2], F2 | 3
    mov eax, PD
    mov cr3, eax
    mov eax, cr0
    or eax, 0x80000000
    mov cr0, eax
    jmp .paged
.paged:

    PRINT `remap with invlpg\n`
    xor ebx, ebx
    mov ecx, 40
.hot1:
    mov edx, WIN
    call edx
    add ebx, eax
    loop .hot1
    mov dword [PT1], F2 | 3
    invlpg [WIN]
    mov edx, WIN
    call edx
    SHOW "now", eax
    mov ecx, 40
.alt:
    mov eax, ecx
    and eax, 1
    shl eax, 12
    add eax, F1 | 3                 ; F1 on even counts, F2 on odd ones
    mov [PT1], eax
    invlpg [WIN]
    mov edx, WIN
    call edx
    add ebx, eax
    add ebx, [edx + 0x800]
    loop .alt
    SHOW "sum", ebx
    call nl

    PRINT `cr3 switch\n`
    mov dword [PT1], F1 | 3
    xor ebx, ebx
    mov ecx, 40
.cr3:
    mov eax, PD
    test ecx, 1
    jz .cr3_set
    mov eax, PD2
.cr3_set:
    mov cr3, eax
    mov edx, WIN
    call edx
    add ebx, eax
    add ebx, [edx + 0x800]
    loop .cr3
    mov eax, PD
    mov cr3, eax
    SHOW "sum", ebx
    call nl

    PRINT `old frame\n`
    mov dword [PT1], F3 | 3         ; the same code in another frame
    invlpg [WIN]
    mov ecx, 20
.f3:
    mov edx, WIN
    call edx
    loop .f3
    SHOW "f3", eax
    mov dword [F1 + 1], 0x9999      ; F1 is not mapped at WIN now
    mov edx, WIN
    call edx
    SHOW "still", eax
    mov edx, WIN
    mov eax, [edx + 0x800]
    SHOW "data", eax
    mov dword [PT1], F1 | 3
    invlpg [WIN]
    mov edx, WIN
    call edx
    SHOW "f1", eax
    call nl

    PRINT `cr0.pg\n`
    xor ebx, ebx
    mov ecx, 40
.pg:
    mov eax, cr0
    xor eax, 0x80000000
    mov cr0, eax
    jmp .pg_flip
.pg_flip:
    mov edx, PGLIN
    call edx
    add ebx, eax
    add ebx, [edx + 0x800]
    loop .pg
    SHOW "sum", ebx
    mov eax, cr0
    bt eax, 31
    setc al
    movzx eax, al
    SHOW "pg", eax
    call nl

    PRINT `cr0.wp\n`
    mov dword [pf_count], 0
    mov dword [hook + 14 * 4], pf_skip
    mov esi, 4                      ; phases: WP off, on, off, on; 16 stores in each
.wp_phase:
    mov eax, cr0
    and eax, ~0x10000
    test esi, 1
    jnz .wp_set
    or eax, 0x10000
.wp_set:
    mov cr0, eax
    mov ecx, 16
.wp:
    lea eax, [esi * 8 + ecx]
    call poke
    loop .wp
    dec esi
    jnz .wp_phase
    mov eax, cr0
    and eax, ~0x10000
    mov cr0, eax
    mov dword [hook + 14 * 4], 0
    SHOW "faults", [pf_count]
    SHOW "last", [ROPAGE]
    call nl

    PRINT `cr4.pse\n`
    xor ebx, ebx
    mov ecx, 40
.pse:
    mov eax, cr4
    xor eax, 0x10
    mov cr4, eax
    mov edx, PSELIN
    call edx
    add ebx, eax
    add ebx, [edx + 0x800]
    loop .pse
    SHOW "sum", ebx
    call nl

    PRINT `cr4.pae\n`              ; 2-level paging (PGLIN: F2) and PAE (identity)
    mov dword [PDPT], PAE_PD | 1
    mov dword [PDPT + 4], 0
    mov dword [PAE_PD], 0x83
    mov dword [PAE_PD + 4], 0
    mov dword [PAE_PD + 8], 0x200000 | 0x83
    mov dword [PAE_PD + 12], 0
    xor ebx, ebx
    mov ecx, 40
.pae:
    mov eax, cr0
    and eax, 0x7fffffff
    mov cr0, eax
    jmp .pae_off
.pae_off:
    mov eax, cr4
    xor eax, 0x20
    mov cr4, eax
    mov edx, PD
    test eax, 0x20
    jz .pae_cr3
    mov edx, PDPT
.pae_cr3:
    mov cr3, edx
    mov eax, cr0
    or eax, 0x80000000
    mov cr0, eax
    jmp .pae_on
.pae_on:
    mov edx, PGLIN
    call edx
    add ebx, eax
    add ebx, [edx + 0x800]
    loop .pae
    SHOW "sum", ebx
    call nl

    mov eax, cr0
    and eax, 0x7fffffff
    mov cr0, eax
    jmp .flat
.flat:
    mov eax, cr4
    and eax, ~0x30
    mov cr4, eax
    ret

; put_func: at EDI, "mov eax, EAX; ret"
put_func:
    mov byte [edi], 0xb8
    mov [edi + 1], eax
    mov byte [edi + 5], 0xc3
    ret

; poke: a ring-0 store to the read-only page (2 bytes: 89 02), #PF when CR0.WP
poke:
    mov edx, ROPAGE
    mov [edx], eax
    ret

; the #PF hook: count it and step over the 2-byte store
pf_skip:
    inc dword [pf_count]
    add dword [esp + 8], 2
    add esp, 8                      ; vector, error code
    iret

pf_count: dd 0
END_IMAGE
