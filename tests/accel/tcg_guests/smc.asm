; Self-modifying and cross-modifying code, as translation caches must handle it: a hot
; function whose immediate is rewritten between calls, code rewritten through another
; virtual mapping of the same physical page (paging), code copied with REP MOVSB over
; code that already ran, and a store into the current block followed by a jump.
%define EXIT_CODE 0x4b
%include "lib.inc"

%define PD      0x200000
%define PT0     0x201000
%define PT1     0x202000
%define ALIAS   0x40000000          ; a second mapping of the page holding `patchme`

main:
    PRINT `hot function\n`
    xor ebx, ebx
    mov ecx, 300                    ; enough calls to make it hot in a translator
.hot:
    call patchme
    add ebx, eax
    cmp ecx, 100
    jne .same
    mov dword [patchme.imm], 1000   ; from the 100th call on it returns 1000
.same:
    loop .hot
    SHOW "sum", ebx
    call nl

    PRINT `through an alias\n`
    mov edi, PD
    xor eax, eax
    mov ecx, 3 * 1024
    rep stosd
    mov edi, PT0
    mov eax, 3
    mov ecx, 1024
.id:
    stosd
    add eax, 0x1000
    loop .id
    mov dword [PD], PT0 | 3
    mov dword [PD + 0x100 * 4], PT1 | 3
    mov eax, patchme
    and eax, ~0xfff
    or eax, 3
    mov [PT1], eax
    mov eax, PD
    mov cr3, eax
    mov eax, cr0
    or eax, 0x80000000
    mov cr0, eax
    jmp .paged
.paged:
    call patchme
    SHOW "before", eax
    mov eax, patchme.imm
    and eax, 0xfff
    mov dword [ALIAS + eax], 77     ; the same byte, written through the alias
    call patchme
    SHOW "after", eax
    mov eax, cr0
    and eax, 0x7fffffff
    mov cr0, eax
    jmp .flat
.flat:
    call nl

    PRINT `copied code\n`
    call slot
    SHOW "slot", eax
    mov esi, slot_b
    mov edi, slot
    mov ecx, slot_b_end - slot_b
    rep movsb
    call slot
    SHOW "slot", eax
    call nl

    PRINT `same block\n`
    xor eax, eax
    mov byte [.target + 1], 42      ; rewrite the MOV below, then jump to it
    jmp .target
.target:
    mov al, 1
    movzx eax, al
    SHOW "al", eax
    call nl
    ret

patchme:
    mov eax, 1
.imm equ $ - 4
    ret

slot:
    mov eax, 0x11111111
    ret
    times 16 nop
slot_b:
    mov eax, 0x22222222
    xor eax, 0x00ff00ff
    ret
slot_b_end:
END_IMAGE
