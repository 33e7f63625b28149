; Virtual-8086 mode (no VME): entered by IRET from ring 0 with VM set in the frame, left
; by every exception and interrupt to ring-0 handlers, which see the VM86 frame (EIP, CS,
; EFLAGS, ESP, SS, ES, DS, FS, GS), start with null data segments, and return by IRET.
; At IOPL 0: PUSHF, CLI, INT n, IN (no I/O bitmap) and the privileged HLT / MOV from CR0
; are #GP(0); INT3 goes through its DPL-3 gate; UD2 and ARPL are #UD. Then at IOPL 3
; (the handler raises it in the frame): PUSHF/POPF/CLI/STI work, POPF keeps IOPL, INT n
; goes through its DPL-3 gate, IRET inside VM86 returns real-mode style. Segment loads
; are real-mode style throughout.
%define EXIT_CODE 0x50
%include "lib.inc"

%define V86_BASE    0x8000          ; the VM86 code is copied here: CS = 0x0800, IP = 0
%define V86_CS      0x0800
%define V86_SS      0x0700
%define V86_SP      0x0f00
%define V86_DS      0x0900
%define IOPL3_STEP  8               ; the exit after which the handler raises IOPL to 3
%define FLAGS_SHOWN 0x23ec5         ; VM IOPL DF IF OF SF ZF PF CF (not RF, AF)

; SHOW16 "label", word: the word zero-extended (a pushed selector's upper half is not
; defined; VM86 registers are 16-bit).
%macro SHOW16 2
    movzx eax, word %2
    SHOW %1, eax
%endmacro

main:
    pushad
    mov [main_esp], esp
    mov esi, section..v86.start
    mov edi, V86_BASE
    mov ecx, v86_end - v86_start
    rep movsb
    mov ecx, 6
    mov eax, v86_ud
    mov edx, 0x8e00
    call set_gate
    mov ecx, 13
    mov eax, v86_gp
    call set_gate
    mov ecx, 3
    mov eax, v86_bp
    mov edx, 0xef00                 ; trap gate, DPL 3
    call set_gate
    mov ecx, 0x31
    mov eax, v86_int31
    mov edx, 0xee00                 ; interrupt gate, DPL 3
    call set_gate
    PRINT `vm86\n`
    xor eax, eax
    push eax                        ; GS
    push eax                        ; FS
    push dword V86_DS
    push dword 0x0b00               ; ES
    push dword V86_SS
    push dword V86_SP
    push dword 0x00020002           ; EFLAGS: VM, IOPL 0, IF clear
    push dword V86_CS
    push dword 0                    ; IP
    iret

finish:                             ; from the last exit, with the kernel's segments
    mov esp, [main_esp]
    popad
    ret

v86_ud:
    push dword 0
    push dword 6
    jmp v86_exit
v86_gp:
    push dword 13
    jmp v86_exit
v86_bp:
    push dword 0
    push dword 3
    jmp v86_exit
v86_int31:
    push dword 0
    push dword 0x31
    jmp v86_exit

; [ebp+32] vector, +36 error, +40 EIP, +44 CS, +48 EFLAGS, +52 ESP, +56 SS, +60 ES,
; +64 DS, +68 FS, +72 GS; pushad below: +28 EAX, +24 ECX, +20 EDX, +16 EBX.
v86_exit:
    pushad
    mov ebp, esp
    mov ax, ds                      ; the data segments as the CPU left them: null
    mov bx, es
    or ax, bx
    mov bx, fs
    or ax, bx
    mov bx, gs
    or ax, bx
    mov dx, SEL_KDATA
    mov ds, dx
    mov es, dx
    movzx eax, ax
    mov [nulls], eax
    SHOW "v", [ebp + 32]
    SHOW "err", [ebp + 36]
    SHOW "ip", [ebp + 40]
    SHOW16 "cs", [ebp + 44]
    mov eax, [ebp + 48]
    and eax, FLAGS_SHOWN
    SHOW "fl", eax
    SHOW "sp", [ebp + 52]
    SHOW16 "ss", [ebp + 56]
    SHOW16 "es", [ebp + 60]
    SHOW16 "ds", [ebp + 64]
    SHOW16 "fs", [ebp + 68]
    SHOW16 "gs", [ebp + 72]
    SHOW "nullsegs", [nulls]
    call nl
    SHOW16 "  ax", [ebp + 28]
    SHOW16 "bx", [ebp + 16]
    SHOW16 "cx", [ebp + 24]
    SHOW16 "dx", [ebp + 20]
    call nl
    mov eax, [step]
    inc dword [step]
    movzx edx, word [resume_ips + eax * 2]
    test edx, edx
    jz finish
    mov [ebp + 40], edx
    cmp eax, IOPL3_STEP
    jne .back
    or dword [ebp + 48], 0x3000
.back:
    popad
    add esp, 8
    iret                            ; back to VM86: the CPU reloads its segments

main_esp: dd 0
step: dd 0
nulls: dd 0
resume_ips:                         ; where each exit goes on (0: the end)
    dw at1, at2, at3, at4, at5, at6, at7, at8, at9, at10, at12, 0

section .v86 follows=.text vstart=0 align=16
bits 16
v86_start:
    mov ax, 0x1234
    mov [0x10], ax                  ; DS = 0x0900: linear 0x9010
    mov bx, [0x10]
    mov cx, ss
    mov dx, sp
    pushf                           ; 0: #GP(0), IOPL 0
at1: cli                             ; 1: #GP(0)
at2: int 0x31                        ; 2: #GP(0): INT n at IOPL 0
at3: int3                            ; 3: its DPL-3 gate (a trap: IP after it)
at4: in al, 0x80                     ; 4: #GP(0): the TSS has no I/O bitmap
at5: mov ax, 0x0b00
    mov es, ax
    mov byte [es:2], 0x5a           ; linear 0xb002
    mov ah, [es:2]
    hlt                             ; 5: #GP(0): privileged
at6: mov eax, cr0                    ; 6: #GP(0)
at7: ud2                             ; 7: #UD
at8: arpl [bx], ax                   ; 8: #UD (protected mode only); IOPL 3 from here
at9: pushf
    pop ax
    cli
    sti
    pushf
    pop bx
    and bx, 0xcfff                  ; POPF at CPL 3 cannot clear IOPL
    push bx
    popf
    pushf
    pop cx
    int 0x31                        ; 9: its DPL-3 gate
at10:
    pushf                           ; IRET inside VM86, real-mode style
    push cs
    push word at11
    mov dx, 0xbeef
    iret
at11:
    int3                            ; 10
at12:
    hlt                             ; 11: #GP(0), the end
v86_end:

section .tail follows=.v86
bits 32
END_IMAGE
