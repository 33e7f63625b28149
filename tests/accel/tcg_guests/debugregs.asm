; Debug-register breakpoints: an execute breakpoint (DR0) faults before the instruction,
; EIP at it, and the handler resumes with RF set so the instruction then runs; a write
; watch on a dword (DR1) traps after the writing instruction, not after a read; a
; read/write watch (DR2, 2 bytes) traps after a read that overlaps it; a breakpoint
; disabled in DR7 stays quiet; with CR4.DE, an I/O breakpoint (DR3) traps after an OUT or
; IN that touches its port. The #DB handler prints DR6's B0-B3 and the pushed EIP.
%define EXIT_CODE 0x52
%include "lib.inc"

main:
    mov dword [hook + 1 * 4], on_db
    PRINT `execute\n`
    mov eax, bp_here
    mov dr0, eax
    mov eax, 0x1                    ; L0, execute, 1 byte
    mov dr7, eax
    mov ecx, 5
bp_here:
    inc ecx                         ; #DB before it, then it runs once
    SHOW "ecx", ecx
    call nl

    PRINT `write watch\n`
    mov eax, var
    mov dr1, eax
    mov eax, (1 << 2) | (1 << 20) | (3 << 22)   ; L1, write, 4 bytes
    mov dr7, eax
    mov eax, [var]                  ; a read: quiet
    mov dword [var + 4], 7          ; next dword: quiet
    mov byte [var + 2], 0x11        ; inside it: #DB after this one
    SHOW "var", [var]
    call nl

    PRINT `read watch\n`
    mov eax, var2 + 2
    mov dr2, eax
    mov eax, (1 << 4) | (3 << 24) | (1 << 26)   ; L2, read/write, 2 bytes
    mov dr7, eax
    mov al, [var2 + 1]              ; quiet
    mov eax, [var2]                 ; overlaps bytes 2-3: #DB after it
    SHOW "eax", eax
    call nl

    PRINT `io\n`
    mov eax, cr4
    or eax, 8                       ; DE: R/W 10 means I/O
    mov cr4, eax
    mov eax, 0x3000                 ; a port no device claims
    mov dr3, eax
    mov eax, (1 << 6) | (2 << 28)   ; L3, I/O, 1 byte
    mov dr7, eax
    mov dx, 0x3001
    out dx, al                      ; quiet
    mov dx, 0x3000
    out dx, al                      ; #DB after it
    mov dx, 0x2fff
    in ax, dx                       ; a word over 0x2fff-0x3000: #DB after it
    mov eax, cr4
    and eax, ~8
    mov cr4, eax

    PRINT `disabled\n`
    xor eax, eax
    mov dr7, eax
    inc dword [var]
    mov eax, [var2]
    mov ecx, bp_here                ; nothing fires
    mov eax, dr7
    and eax, 0xff
    SHOW "dr7", eax
    call nl
    mov dword [hook + 1 * 4], 0
    ret

; frame: [esp] vector, +4 error, +8 EIP, +12 CS, +16 EFLAGS
on_db:
    push eax
    mov eax, dr6
    and eax, 0xf
    SHOW "db b", eax
    mov eax, [esp + 12]
    SHOW "eip", eax
    cmp eax, bp_here
    jne .trap
    PRINT "(at bp_here)"
.trap:
    call nl
    xor eax, eax
    mov dr6, eax
    or dword [esp + 20], 0x10000    ; RF: the instruction at EIP runs without a new #DB
    pop eax
    add esp, 8
    iret

align 4
var: dd 0x44332211, 0
var2: dd 0x88776655
END_IMAGE
