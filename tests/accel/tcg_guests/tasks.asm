; Hardware task switches: CALL to a TSS (busy bit, NT, back link, CR0.TS) and IRET back
; through the back link; JMP to a TSS and back (busy bits move, NT stays clear); INT n
; through a task gate; #GP through a task gate with its error code on the new task's
; stack; a busy TSS as a CALL target (#GP); what each task finds in its registers and what
; the outgoing task's TSS holds afterwards.
%define EXIT_CODE 0x51
%include "lib.inc"

%define SEL_TSS2    0x30
%define SEL_TSS3    0x38
%define SEL_TGATE   0x40            ; a task gate to TSS3 in the GDT
%define STACK2      0x1c0000
%define STACK3      0x1c8000

; TSS_DESC slot, tss: an available 32-bit TSS descriptor, limit 0x67.
%macro TSS_DESC 2
    mov eax, %2
    mov word [gdt + %1], 0x67
    mov [gdt + %1 + 2], ax
    shr eax, 16
    mov [gdt + %1 + 4], al
    mov byte [gdt + %1 + 5], 0x89
    mov byte [gdt + %1 + 6], 0
    mov [gdt + %1 + 7], ah
%endmacro

; TSS_INIT tss, entry, stack, eax: a ring-0 task with flat segments.
%macro TSS_INIT 4
    mov dword [%1 + 0x20], %2
    mov dword [%1 + 0x24], 0x2
    mov dword [%1 + 0x28], %4
    mov dword [%1 + 0x38], %3
    mov dword [%1 + 0x4c], SEL_KCODE
    mov dword [%1 + 0x50], SEL_KDATA
    mov dword [%1 + 0x48], SEL_KDATA
    mov dword [%1 + 0x54], SEL_KDATA
    mov dword [%1 + 0x58], SEL_KDATA
    mov dword [%1 + 0x5c], SEL_KDATA
    mov word [%1 + 0x66], 0x68
%endmacro

main:
    TSS_DESC SEL_TSS2, tss2
    TSS_DESC SEL_TSS3, tss3
    mov dword [gdt + SEL_TGATE], SEL_TSS3 << 16
    mov dword [gdt + SEL_TGATE + 4], 0x8500     ; present task gate, DPL 0
    TSS_INIT tss2, task2, STACK2, 0x22222222
    TSS_INIT tss3, task3, STACK3, 0x33333333
    ; vector 0x41: a task gate to TSS3
    mov dword [idt + 0x41 * 8], SEL_TSS3 << 16
    mov dword [idt + 0x41 * 8 + 4], 0x8500

    PRINT `call\n`
    mov ebx, 0x1234abcd
    clts
    call SEL_TSS2:0
    SHOW "back ebx", ebx            ; our registers came back from our TSS
    call show_tr
    mov eax, cr0
    and eax, 8
    SHOW "ts", eax
    call nl
    SHOW "tss2.eip", [tss2 + 0x20]
    SHOW "tss2.eax", [tss2 + 0x28]
    mov eax, [tss2 + 0x24]
    and eax, 0x4ed5
    SHOW "tss2.fl", eax              ; NT cleared by the IRET
    call show_types
    call nl

    PRINT `jmp\n`
    jmp SEL_TSS2:0                   ; task2 goes on after its IRET and jumps back
task1_back:
    call show_tr
    call show_types
    mov eax, [tss2 + 0x24]
    and eax, 0x4ed5
    SHOW "tss2.fl", eax
    call nl

    PRINT `int gate\n`
    mov dword [tss3 + 0x20], task3   ; task3 starts over
    mov dword [tss3 + 0x38], STACK3
    int 0x41
    SHOW "after int", [tss3 + 0x28]
    call show_types
    call nl

    PRINT `busy\n`
    RESUME .busy
    call SEL_TSS:0                   ; our own TSS is busy: #GP(0x28)
.busy:

    PRINT `gp gate\n`
    mov dword [tss3 + 0x20], task3_gp
    mov dword [tss3 + 0x38], STACK3
    mov dword [idt + 13 * 8], SEL_TSS3 << 16
    mov dword [idt + 13 * 8 + 4], 0x8500
    mov ax, 0x5a
    mov ds, ax                       ; beyond the GDT: #GP(0x58) into task3
gp_back:
    mov ax, SEL_KDATA
    mov ds, ax
    SHOW "gp err", [gp_error]
    call show_types
    call nl
    mov ecx, 13
    mov eax, stubs + 13 * 16
    mov edx, 0x8e00
    call set_gate
    ret

show_tr:
    push eax
    xor eax, eax
    str ax
    SHOW "tr", eax
    pop eax
    ret

show_types:                         ; the type nibbles of the three TSS descriptors
    push eax
    movzx eax, byte [gdt + SEL_TSS + 5]
    and eax, 0xf
    SHOW "t1", eax
    movzx eax, byte [gdt + SEL_TSS2 + 5]
    and eax, 0xf
    SHOW "t2", eax
    movzx eax, byte [gdt + SEL_TSS3 + 5]
    and eax, 0xf
    SHOW "t3", eax
    pop eax
    ret

task2:
    PRINT "task2 "
    SHOW "eax", eax
    call show_tr
    pushfd
    pop eax
    and eax, 0x4000
    SHOW "nt", eax
    movzx eax, word [tss2]
    SHOW "link", eax
    call show_types
    call nl
    mov eax, 0x2222beef
    iret                             ; NT: back to the caller
    ; the JMP resumes here
    PRINT "task2 again "
    pushfd
    pop eax
    and eax, 0x4000
    SHOW "nt", eax
    call show_tr
    call show_types
    call nl
    mov dword [tss + 0x20], task1_back
    jmp SEL_TSS:0

task3:
    PRINT "task3 "
    SHOW "eax", eax
    call show_tr
    movzx eax, word [tss3]
    SHOW "link", eax
    call nl
    mov eax, 0x3333cafe
    iret

task3_gp:
    pop eax                          ; the error code, on this task's stack
    mov [gp_error], eax
    PRINT "task3 gp "
    SHOW "esp", esp
    call nl
    mov dword [tss + 0x20], gp_back  ; do not retry the faulting MOV
    iret

gp_error: dd 0
align 16
tss2: times 104 db 0
align 16
tss3: times 104 db 0
END_IMAGE
